"""Base models: describe and fingerprint a loaded causal LM."""

import hashlib
import json

from .artifact import BaseModelSpec


def param_shapes(model):
    """Parameter name -> shape, the names as the bare decoder (no PEFT prefix) knows them."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def fingerprint(model):
    """sha256 over the config and every weight's bytes, stable across loads and devices."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor):
    """Bytes in float32 so that the same weights fingerprint alike whatever dtype they load in."""
    import torch

    return tensor.detach().to("cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def describe(model):
    """The BaseModelSpec of a loaded model, for validating expert files against it."""
    config = model.config
    return BaseModelSpec(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        fingerprint=fingerprint(model),
        param_shapes=param_shapes(model),
    )
