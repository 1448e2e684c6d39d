"""The expert file: one safetensors file, validated from its header alone.

Layout (docs/method.md, "The expert file"):

- ``soft_tokens``: ``[n_latents, hidden]``, the coprocessor's trainable input embeddings.
- kind ``lora``: PEFT-named LoRA tensors,
  ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``.
- kind ``full``: the coprocessor's own weights, ``coprocessor.<decoder parameter name>``.
- optional latent head tensors (``latent_head.*``, see ``HEAD_TENSORS``).
- optional static prefix (format 2): ``prefix.keys`` and ``prefix.values``
  ``[num_layers, kv_heads, prefix_positions, head_dim]``, ``prefix.gate`` ``[prefix_positions]``.
- kind ``prefix``: the static prefix alone (``n_latents`` 0, no coprocessor tensors).
- ``__metadata__``: string values; ``format`` is ``latentry.coprocessor/2`` (files of format 1,
  without a prefix, still load).

Nothing here unpickles: a file is parsed as 8 bytes of header length, a JSON header, and raw
tensor bytes whose offsets must tile the rest of the file exactly. Hub-style folders built on
the file (PEFT adapters, the model card) are ``hub``'s.
"""

import json
import re
import struct
from dataclasses import dataclass, field

from . import bounded_json

FORMAT_TAG = "latentry.coprocessor/2"
READABLE_FORMATS = ("latentry.coprocessor/1", FORMAT_TAG)
KINDS = ("lora", "full", "prefix")
ALLOWED_DTYPES = ("F32", "F16", "BF16")
# Defaults of the bounds a caller may tighten (the registry passes its settings): a real
# expert's header is tens of kilobytes, its config a few hundred bytes.
MAX_HEADER_BYTES = 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024
MAX_JSON_DEPTH = bounded_json.MAX_DEPTH  # of the header and of JSON inside its metadata
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
FINITE_CHECK_CHUNK = 4 * 1024 * 1024  # bytes read at a time when checking values
# The most latents an expert may put in a request's cache: the router keeps this many positions
# of the context free for them, so training, upload and serving share one ceiling.
MAX_LATENTS = 64
# The most static prefix positions an expert may carry (the router serves a request plain when
# an expert's prefix and latents do not fit its context).
MAX_PREFIX_POSITIONS = 256

LORA_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
FULL_NAME = re.compile(r"^coprocessor\.(?P<param>.+)$")
LAYER_INDEX = re.compile(r"\.(?:layers|h)\.(\d+)\.")

# Small tensors of the latent head that sit between the coprocessor and the decoder. Shapes are
# written with the symbols "hidden" and "n_latents".
HEAD_TENSORS = {
    "latent_head.proj.weight": ("hidden", "hidden"),
    "latent_head.proj.bias": ("hidden",),
    "latent_head.anchors": ("n_latents", "hidden"),
    "latent_head.gate": ("n_latents",),
}
PREFIX_TENSORS = {
    "prefix.keys": ("num_layers", "kv_heads", "prefix_positions", "head_dim"),
    "prefix.values": ("num_layers", "kv_heads", "prefix_positions", "head_dim"),
    "prefix.gate": ("prefix_positions",),
}

REQUIRED_METADATA = (
    "format",
    "kind",
    "base_model_fingerprint",
    "n_latents",
    "hidden_size",
    "num_layers",
)


class ArtifactError(ValueError):
    """The file is not a valid expert for this base model; the message says why."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ExpertHeader:
    """What the safetensors header of an expert file says, parsed but not yet validated."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    header_bytes: int

    @property
    def kind(self):
        return self.metadata.get("kind")

    @property
    def n_latents(self):
        return _int_field(self.metadata, "n_latents")

    @property
    def prefix_positions(self):
        return _int_field(self.metadata, "prefix_positions") or 0

    @property
    def config(self):
        return _json_field(self.metadata, "config", default={})

    @property
    def data_bytes(self):
        return max((t.end for t in self.tensors.values()), default=0)


@dataclass(frozen=True)
class BaseModelSpec:
    """The facts about a base model that an expert file is checked against."""

    hidden_size: int
    num_layers: int
    fingerprint: str = ""
    # Parameter name -> shape of the base model's weights, e.g.
    # {"model.layers.0.self_attn.q_proj.weight": [576, 576]}. Checks LoRA and full tensors.
    param_shapes: dict[str, list[int]] = field(default_factory=dict)
    # The cache's heads and head size (0: unknown; then only their product is checked, against
    # the key projection's output in param_shapes). Checks a static prefix.
    kv_heads: int = 0
    head_dim: int = 0

    def max_tensors(self):
        """The most tensors an expert can use: a LoRA pair per base weight (or a copy of each
        parameter), the latent head's, the prefix's and the soft tokens."""
        extras = len(HEAD_TENSORS) + len(PREFIX_TENSORS) + 1
        # Without the parameter list: generously, 16 weights per layer and a few outside.
        weights = len(self.param_shapes) or 16 * self.num_layers + 8
        return 2 * weights + extras


def read_header(fileobj, file_size, max_header_bytes=MAX_HEADER_BYTES):
    """Parse the safetensors header of ``fileobj`` (positioned anywhere) without reading data.
    ``max_header_bytes`` None: only the file's size bounds the header (a file already trusted)."""
    fileobj.seek(0)
    prefix = fileobj.read(8)
    if len(prefix) < 8:
        raise ArtifactError("file is too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", prefix)
    max_header_bytes = max_header_bytes or file_size
    if header_len == 0 or (header_len > max_header_bytes and header_len > file_size - 8):
        raise ArtifactError(_not_safetensors_reason(prefix, header_len, file_size))
    if header_len > max_header_bytes:
        raise ArtifactError(
            f"safetensors header is {header_len} bytes, over the limit of {max_header_bytes}"
        )
    raw = fileobj.read(header_len)
    if len(raw) < header_len:
        if raw.startswith(b"{"):
            raise ArtifactError(
                f"file is truncated: its header needs {header_len} bytes, only {len(raw)} follow"
            )
        raise ArtifactError(_not_safetensors_reason(prefix, header_len, file_size))
    if not raw.lstrip().startswith(b"{"):
        raise ArtifactError(_not_safetensors_reason(prefix, header_len, file_size))
    header = load_json(raw, "safetensors header")
    if not isinstance(header, dict):
        raise ArtifactError("safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ArtifactError("__metadata__ must map strings to strings")
    tensors = {name: _tensor_info(name, entry) for name, entry in header.items()}
    _check_offsets(tensors, file_size - 8 - header_len)
    return ExpertHeader(metadata=metadata, tensors=tensors, header_bytes=header_len)


def _not_safetensors_reason(prefix, header_len, file_size):
    """Name the common wrong formats: they are what people upload by mistake."""
    if prefix.startswith(b"PK\x03\x04"):
        return "this is a zip archive (torch.save format); only safetensors files are accepted"
    if prefix[:1] == b"\x80":
        return "this is a Python pickle; only safetensors files are accepted"
    return (
        f"not a safetensors file: header length {header_len} does not fit a file of "
        f"{file_size} bytes"
    )


def read_header_from_path(path):
    """The header of a local file (exported or about to be imported: the registry checks
    uploads with its own bounds)."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        return read_header(f, size, max_header_bytes=None)


def validate(header, spec, *, file_size=None, max_bytes=None, max_config_bytes=MAX_CONFIG_BYTES):
    """Check an expert header against a base model. Raise ArtifactError listing every problem."""
    if max_bytes is not None and file_size is not None and file_size > max_bytes:
        raise ArtifactError(f"file is {file_size} bytes, over the limit of {max_bytes}")
    config_bytes = len(header.metadata.get("config", "").encode())
    if max_config_bytes is not None and config_bytes > max_config_bytes:
        raise ArtifactError(
            f"metadata 'config' is {config_bytes} bytes, over the limit of {max_config_bytes}"
        )
    if len(header.tensors) > spec.max_tensors():
        raise ArtifactError(
            f"file has {len(header.tensors)} tensors, an expert for this base model has at "
            f"most {spec.max_tensors()}"
        )
    problems = _metadata_problems(header.metadata, spec)
    if not problems:
        problems = _tensor_problems(header, spec)
    if problems:
        raise ArtifactError(_joined(problems))


def check_finite(fileobj, header):
    """Refuse NaN and infinite values in any tensor. Reads the data section once, in chunks of
    FINITE_CHECK_CHUNK bytes, so a large file is never held in memory."""
    import torch

    data_start = 8 + header.header_bytes
    bad = [
        f"tensor {name!r} has NaN or infinite values"
        for name, info in sorted(header.tensors.items(), key=lambda item: item[1].start)
        if not _finite(
            fileobj, data_start + info.start, info, getattr(torch, TORCH_DTYPES[info.dtype])
        )
    ]
    if bad:
        raise ArtifactError(_joined(bad))


def _finite(fileobj, offset, info, dtype):
    import torch

    fileobj.seek(offset)
    remaining = info.end - info.start
    while remaining:
        chunk = fileobj.read(min(FINITE_CHECK_CHUNK, remaining))
        if not chunk:
            raise ArtifactError("file is truncated: its tensor data ends early")
        remaining -= len(chunk)
        # whole elements: a file read returns what was asked (chunk sizes are multiples of 4)
        if not torch.isfinite(torch.frombuffer(bytearray(chunk), dtype=dtype)).all():
            return False
    return True


def _joined(problems, shown=5, width=300):
    """Problems as one message of bounded length: the first few, and how many more."""
    text = "; ".join(p if len(p) <= width else p[: width - 1] + "…" for p in problems[:shown])
    return text + (f"; and {len(problems) - shown} more" if len(problems) > shown else "")


def load_json(text, what, max_bytes=None):
    """JSON of at most MAX_JSON_DEPTH levels (``bounded_json``): deeper JSON is refused, not a
    RecursionError. Any refusal is an ArtifactError naming ``what``; ``hub`` reads a folder's
    JSON with it too."""
    try:
        return bounded_json.loads(text, max_depth=MAX_JSON_DEPTH, max_bytes=max_bytes)
    except bounded_json.Refused as exc:
        raise ArtifactError(f"{what} {exc}") from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ArtifactError(f"{what} is not valid JSON: {exc}") from None


def _tensor_info(name, entry):
    if not isinstance(entry, dict):
        raise ArtifactError(f"tensor {name!r}: header entry must be an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ALLOWED_DTYPES:
        raise ArtifactError(
            f"tensor {name!r}: dtype {dtype!r} is not allowed (use one of "
            f"{', '.join(ALLOWED_DTYPES)})"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 1 for d in shape)):
        raise ArtifactError(
            f"tensor {name!r}: shape must be a list of positive integers (no zero dimension)"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise ArtifactError(f"tensor {name!r}: data_offsets must be [start, end]")
    count = 1
    for d in shape:
        count *= d
    if offsets[1] - offsets[0] != count * DTYPE_BYTES[dtype]:
        raise ArtifactError(f"tensor {name!r}: byte range does not match its shape and dtype")
    return TensorInfo(dtype=dtype, shape=tuple(shape), start=offsets[0], end=offsets[1])


def _check_offsets(tensors, data_size):
    """The tensors' byte ranges must tile the data section exactly, with no gap or overlap."""
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            raise ArtifactError("tensor data has gaps or overlaps")
        position = info.end
    if position != data_size:
        raise ArtifactError(
            f"file is truncated or padded: tensors cover {position} bytes of data, "
            f"the file holds {data_size}"
        )


def _int_field(metadata, key):
    try:
        value = int(metadata[key])
    except (KeyError, ValueError):
        return None
    return value


def _json_field(metadata, key, default=None):
    if key not in metadata:
        return default
    return load_json(metadata[key], f"metadata {key!r}")


def _metadata_problems(metadata, spec):
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        return [f"metadata is missing {', '.join(missing)}"]
    problems = []
    if metadata["format"] not in READABLE_FORMATS:
        problems.append(f"format tag is {metadata['format']!r}, expected {FORMAT_TAG!r}")
    if metadata["kind"] not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)}, got {metadata['kind']!r}")
    problems += _size_problems(metadata)
    for key, expected in (("hidden_size", spec.hidden_size), ("num_layers", spec.num_layers)):
        if _int_field(metadata, key) != expected:
            problems.append(f"{key} is {metadata[key]}, the base model has {expected}")
    fingerprint = metadata["base_model_fingerprint"]
    if spec.fingerprint and fingerprint != spec.fingerprint:
        problems.append(
            f"trained for base model fingerprint {fingerprint[:12]}…, this base model is "
            f"{spec.fingerprint[:12]}…"
        )
    if not isinstance(_json_field(metadata, "config", default={}), dict):
        problems.append("metadata 'config' must be a JSON object")
    if metadata["kind"] == "lora":
        if _int_field(metadata, "lora_rank") is None:
            problems.append("LoRA experts need an integer lora_rank in the metadata")
        targets = _json_field(metadata, "lora_target_modules", default=None)
        if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
            problems.append("LoRA experts need lora_target_modules, a JSON list of names")
    return problems


def _size_problems(metadata):
    """n_latents and prefix_positions: in range, and at least one of them (format 2 only)."""
    n_latents = _int_field(metadata, "n_latents")
    positions = _int_field(metadata, "prefix_positions") if "prefix_positions" in metadata else 0
    if metadata["format"] != FORMAT_TAG:
        positions = 0  # format 1 had no prefix
    if positions is None or not 0 <= positions <= MAX_PREFIX_POSITIONS:
        return [f"prefix_positions must be an integer from 0 to {MAX_PREFIX_POSITIONS}"]
    if metadata["kind"] == "prefix":
        if n_latents != 0 or not positions:
            return ["a prefix expert needs n_latents 0 and prefix_positions from 1"]
        return []
    if n_latents is None or not 1 <= n_latents <= MAX_LATENTS:
        return [f"n_latents must be an integer from 1 to {MAX_LATENTS}"]
    return []


def _tensor_problems(header, spec):
    meta = header.metadata
    kind = meta["kind"]
    sizes = {
        "hidden": spec.hidden_size,
        "n_latents": int(meta["n_latents"]),
        "prefix_positions": header.prefix_positions,
    }
    problems = _prefix_problems(header, spec)
    if kind != "prefix":
        problems += _soft_token_problems(header.tensors.get("soft_tokens"), sizes)
    lora_pairs, full_count = {}, 0
    for name, info in header.tensors.items():
        if name in PREFIX_TENSORS or (name == "soft_tokens" and kind != "prefix"):
            continue
        if name in HEAD_TENSORS and kind != "prefix":
            expected = tuple(sizes[s] for s in HEAD_TENSORS[name])
            if info.shape != expected:
                problems.append(f"{name} has shape {list(info.shape)}, expected {list(expected)}")
        elif kind == "lora" and (match := LORA_NAME.match(name)):
            lora_pairs.setdefault(match["module"], {})[match["ab"]] = info.shape
        elif kind == "full" and (match := FULL_NAME.match(name)):
            full_count += 1
            problems += _full_tensor_problems(name, match["param"], info.shape, spec)
        else:
            problems.append(f"unexpected tensor {name!r} for a {kind} expert")
    if kind == "lora":
        problems += _lora_problems(lora_pairs, meta, spec)
    elif kind == "full" and full_count == 0:
        problems.append("a full expert needs coprocessor.* weight tensors")
    return problems


def _soft_token_problems(soft, sizes):
    if soft is None:
        return ["tensor 'soft_tokens' is missing"]
    expected = (sizes["n_latents"], sizes["hidden"])
    if soft.shape != expected:
        return [f"soft_tokens has shape {list(soft.shape)}, expected {list(expected)}"]
    return []


def _prefix_problems(header, spec):
    """The static prefix's tensors: all three or none, shaped like the base model's cache."""
    positions = header.prefix_positions
    present = [name for name in PREFIX_TENSORS if name in header.tensors]
    if not positions:
        return [f"unexpected tensor {name!r}: prefix_positions is 0" for name in present]
    if len(present) < len(PREFIX_TENSORS):
        return [f"a prefix of {positions} positions needs the tensors {', '.join(PREFIX_TENSORS)}"]
    problems = []
    gate = header.tensors["prefix.gate"].shape
    if gate != (positions,):
        problems.append(f"prefix.gate has shape {list(gate)}, expected [{positions}]")
    for name in ("prefix.keys", "prefix.values"):
        shape = header.tensors[name].shape
        if problem := _cache_shape_problem(name, shape, positions, spec):
            problems.append(problem)
    return problems


def _cache_shape_problem(name, shape, positions, spec):
    if len(shape) != 4 or shape[0] != spec.num_layers or shape[2] != positions:
        return (
            f"{name} has shape {list(shape)}, expected [{spec.num_layers}, kv_heads, "
            f"{positions}, head_dim]"
        )
    heads, head_dim = shape[1], shape[3]
    if spec.kv_heads and (heads, head_dim) != (spec.kv_heads, spec.head_dim):
        return (
            f"{name} has {heads} heads of {head_dim}, the base model's cache has "
            f"{spec.kv_heads} of {spec.head_dim}"
        )
    key_proj = spec.param_shapes.get("model.layers.0.self_attn.k_proj.weight")
    if key_proj and heads * head_dim != key_proj[0]:
        return (
            f"{name} has {heads} x {head_dim} key features, the base model's keys have "
            f"{key_proj[0]}"
        )
    return None


def _layer_problem(name, spec):
    match = LAYER_INDEX.search("." + name)
    if match and int(match[1]) >= spec.num_layers:
        return f"{name} names layer {match[1]}, the base model has {spec.num_layers} layers"
    return None


def _full_tensor_problems(name, param, shape, spec):
    if problem := _layer_problem(param, spec):
        return [problem]
    if spec.param_shapes:
        expected = spec.param_shapes.get(param)
        if expected is None:
            return [f"{name}: the base model has no parameter {param!r}"]
        if list(shape) != list(expected):
            return [f"{name} has shape {list(shape)}, the base model's is {list(expected)}"]
    return []


def _lora_problems(pairs, meta, spec):
    if not pairs:
        return ["a LoRA expert needs lora_A/lora_B tensors"]
    rank = int(meta["lora_rank"])
    if rank < 1:
        return [f"lora_rank is {rank}, it must be at least 1"]
    targets = set(_json_field(meta, "lora_target_modules"))  # a list of names: checked before
    problems = []
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: lora_A and lora_B must come in pairs")
            continue
        if problem := _layer_problem(module, spec):
            problems.append(problem)
            continue
        if module.rsplit(".", 1)[-1] not in targets:
            problems.append(f"{module} is not among lora_target_modules")
        (a_rank, a_in), (b_out, b_rank) = _2d(ab["A"]), _2d(ab["B"])
        if a_rank != rank or b_rank != rank:
            problems.append(f"{module}: LoRA rank is {a_rank}/{b_rank}, metadata says {rank}")
        expected = spec.param_shapes.get(f"{module}.weight") if spec.param_shapes else None
        if spec.param_shapes and expected is None:
            problems.append(f"{module}: the base model has no such module")
        # transformers' Conv1D (gpt2) stores its weight as [in, out]: accept either layout.
        elif expected is not None and list(expected) not in ([b_out, a_in], [a_in, b_out]):
            problems.append(
                f"{module}: LoRA maps {a_in} -> {b_out}, the base model's weight is "
                f"{list(expected)}"
            )
    return problems


def _2d(shape):
    return shape if len(shape) == 2 else (-1, -1)


def build_metadata(
    *,
    kind,
    base_model_fingerprint,
    n_latents,
    hidden_size,
    num_layers,
    prefix_positions=0,
    base_model_id="",
    lora_rank=None,
    lora_alpha=None,
    lora_target_modules=None,
    config=None,
):
    """The ``__metadata__`` dict of an expert file, every value a string as safetensors wants."""
    metadata = {
        "format": FORMAT_TAG,
        "kind": kind,
        "base_model_fingerprint": base_model_fingerprint,
        "base_model_id": base_model_id,
        "n_latents": str(n_latents),
        "prefix_positions": str(prefix_positions),
        "hidden_size": str(hidden_size),
        "num_layers": str(num_layers),
        "config": json.dumps(config or {}, sort_keys=True),
    }
    if kind == "lora":
        metadata["lora_rank"] = str(lora_rank)
        metadata["lora_alpha"] = str(lora_alpha if lora_alpha is not None else lora_rank)
        metadata["lora_target_modules"] = json.dumps(sorted(lora_target_modules or []))
    return metadata


def save_expert(path, tensors, metadata):
    """Write ``tensors`` (name -> torch tensor) and ``metadata`` as one safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def load_expert(path, device="cpu"):
    """Read an expert file: (tensors, metadata). Uses safetensors only; nothing is unpickled."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        metadata = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    return tensors, metadata


def load_expert_bytes(data, spec=None, max_bytes=None):
    """(tensors, metadata) of an expert file held in memory, validated against ``spec`` first
    when given. safetensors only; nothing is unpickled."""
    import io

    from safetensors.torch import load

    # The size bounds on headers and configs keep abusive uploads out (the registry applies its
    # settings at publish); a file already published is loaded whatever they are now.
    header = read_header(io.BytesIO(data), len(data), max_header_bytes=None)
    if spec is not None:
        validate(header, spec, file_size=len(data), max_bytes=max_bytes, max_config_bytes=None)
    return load(data), header.metadata
