"""The expert file is validated from its safetensors header alone."""

import io
import pickle
import struct

import pytest
import torch

from coprocessor import artifact
from tests.factories import expert_file_bytes


def check(data, spec, **kwargs):
    header = artifact.read_header(io.BytesIO(data), len(data))
    artifact.validate(header, spec, file_size=len(data), **kwargs)
    return header


def test_it_accepts_a_valid_lora_expert(tiny_spec):
    header = check(expert_file_bytes(tiny_spec), tiny_spec)
    assert header.kind == "lora"
    assert header.n_latents == 4
    assert header.config == {"ahead_tokens": 4}


def test_peft_names_round_trip_through_save_and_load(tiny_spec, tmp_path):
    data = expert_file_bytes(tiny_spec)
    path = tmp_path / "e.safetensors"
    path.write_bytes(data)
    tensors, metadata = artifact.load_expert(path)
    assert metadata["format"] == artifact.FORMAT_TAG
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors


@pytest.mark.parametrize(
    "data, message",
    [
        (pickle.dumps({"soft_tokens": [1, 2, 3]}), "pickle"),
        (b"\x00" * 3, "too short"),
        (bytes(range(256)) * 40, "header length"),
    ],
    ids=["pickle", "tiny", "random-bytes"],
)
def test_it_rejects_what_is_not_safetensors(tiny_spec, data, message):
    with pytest.raises(artifact.ArtifactError, match=message):
        check(data, tiny_spec)


def test_it_rejects_torch_save_files(tiny_spec):
    buffer = io.BytesIO()
    torch.save({"soft_tokens": torch.zeros(4, 32)}, buffer)
    with pytest.raises(artifact.ArtifactError, match="torch.save"):
        check(buffer.getvalue(), tiny_spec)


def test_it_rejects_a_truncated_file(tiny_spec):
    data = expert_file_bytes(tiny_spec)
    with pytest.raises(artifact.ArtifactError, match="truncated"):
        check(data[: len(data) - 10], tiny_spec)
    (header_len,) = struct.unpack("<Q", data[:8])
    with pytest.raises(artifact.ArtifactError):
        check(data[: 8 + header_len // 2], tiny_spec)


def test_it_rejects_a_header_that_is_not_json(tiny_spec):
    data = struct.pack("<Q", 4) + b"{{{{" + b"\x00" * 16
    with pytest.raises(artifact.ArtifactError, match="not valid JSON"):
        check(data, tiny_spec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(metadata={"format": "something/2"}), "format tag"),
        (dict(metadata={"kind": "adapter"}), "kind must be one of"),
        (dict(metadata={"hidden_size": "64"}), "hidden_size is 64"),
        (dict(metadata={"num_layers": "3"}), "num_layers is 3"),
        (dict(metadata={"base_model_fingerprint": "0" * 64}), "fingerprint"),
        (dict(metadata={"lora_rank": "8"}), "rank"),
        (dict(tensors={"soft_tokens": torch.zeros(4, 64)}), "soft_tokens has shape"),
        (dict(tensors={"soft_tokens": torch.zeros(4, 32, dtype=torch.int64)}), "dtype"),
        (
            dict(
                tensors={
                    "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(
                        2, 32
                    ),
                    "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(
                        32, 2
                    ),
                }
            ),
            "layer 7",
        ),
        (
            dict(
                tensors={
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": torch.zeros(
                        2, 32
                    ),
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": torch.zeros(
                        32, 2
                    ),
                }
            ),
            "LoRA maps 32 -> 32, the base model's weight is \\[16, 32\\]",
        ),
        (
            dict(
                tensors={
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
                        2, 48
                    ),
                }
            ),
            "LoRA maps 48 -> 32",
        ),
        (dict(tensors={"evil.weight": torch.zeros(1)}), "unexpected tensor 'evil.weight'"),
    ],
    ids=[
        "format",
        "kind",
        "hidden",
        "layers",
        "fingerprint",
        "rank",
        "soft-shape",
        "dtype",
        "layer-index",
        "module-shape",
        "lora-in",
        "unknown-tensor",
    ],
)
def test_it_names_what_is_wrong(tiny_spec, kwargs, message):
    with pytest.raises(artifact.ArtifactError, match=message):
        check(expert_file_bytes(tiny_spec, **kwargs), tiny_spec)


def test_it_enforces_the_size_limit(tiny_spec):
    data = expert_file_bytes(tiny_spec)
    with pytest.raises(artifact.ArtifactError, match="over the limit"):
        check(data, tiny_spec, max_bytes=len(data) - 1)


def test_a_full_expert_must_match_the_base_models_parameters(tiny_spec):
    name = "model.layers.0.mlp.up_proj.weight"
    shape = tiny_spec.param_shapes[name]
    meta = artifact.build_metadata(
        kind="full",
        base_model_fingerprint=tiny_spec.fingerprint,
        n_latents=2,
        hidden_size=tiny_spec.hidden_size,
        num_layers=tiny_spec.num_layers,
    )
    from safetensors.torch import save

    good = save(
        {"soft_tokens": torch.zeros(2, 32), f"coprocessor.{name}": torch.zeros(*shape)},
        metadata=meta,
    )
    check(good, tiny_spec)
    bad = save(
        {"soft_tokens": torch.zeros(2, 32), f"coprocessor.{name}": torch.zeros(3, 3)}, metadata=meta
    )
    with pytest.raises(artifact.ArtifactError, match="the base model's is"):
        check(bad, tiny_spec)


def test_a_file_with_lora_on_some_layers_only_loads_as_exactly_those(tiny_spec, tiny_base_dir):
    """A valid upload (LoRA on q and v only, no latent head: the paper's latents are C's
    hidden states) loads for the router, too."""
    from coprocessor import base_models
    from coprocessor.expert import Coprocessor

    decoder, _ = base_models.load(tiny_base_dir)
    data = expert_file_bytes(tiny_spec, targets=("q_proj", "v_proj"))
    expert = Coprocessor.from_bytes(decoder, data, tiny_spec)
    leaves = {name.rsplit(".", 1)[-1] for name in expert.lora_names}
    assert leaves == {"q_proj", "v_proj"} and len(expert.lora_names) == 2 * tiny_spec.num_layers
    hidden = torch.randn(1, 4, tiny_spec.hidden_size)
    torch.testing.assert_close(expert.latent_head(hidden), hidden)
    assert (expert.latent_head.gate == 0).all()


def deep(levels):
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "positive integers \\(no zero dimension\\)"),
        (dict(metadata={"lora_rank": "0"}), "lora_rank is 0, it must be at least 1"),
        (dict(tensors={"soft_tokens": torch.zeros(0, 32)}), "no zero dimension"),
        (dict(metadata={"config": deep(20_000)}), "metadata 'config' is nested more than 32"),
        (dict(metadata={"config": deep(33)}), "nested more than 32 levels deep"),
        (dict(metadata={"lora_target_modules": deep(100_000)}), "nested more than 32"),
        (dict(metadata={"lora_target_modules": '{"q_proj": 1}'}), "a JSON list of names"),
    ],
    ids=[
        "rank-0-tensors",
        "rank-0",
        "zero-dim",
        "deep-config",
        "33-levels",
        "deep-targets",
        "targets",
    ],
)
def test_hostile_files_are_refused_with_a_reason(tiny_spec, kwargs, message):
    with pytest.raises(artifact.ArtifactError, match=message):
        check(expert_file_bytes(tiny_spec, **kwargs), tiny_spec)


def test_a_file_with_many_problems_gets_a_message_of_bounded_length(tiny_spec):
    name = "evil." + "x" * 2000
    wrong = {f"{name}.{i}.weight": torch.zeros(1) for i in range(tiny_spec.max_tensors() // 2)}
    with pytest.raises(artifact.ArtifactError) as raised:
        check(expert_file_bytes(tiny_spec, tensors=wrong), tiny_spec)
    assert len(str(raised.value)) < 2000 and "more" in str(raised.value)


def test_more_tensors_than_the_base_model_can_use_are_refused(tiny_spec):
    many = {f"extra.{i}": torch.zeros(1) for i in range(tiny_spec.max_tensors())}
    with pytest.raises(
        artifact.ArtifactError, match="tensors, an expert for this base model has at most"
    ):
        check(expert_file_bytes(tiny_spec, tensors=many), tiny_spec)


def test_header_and_config_sizes_are_bounded(tiny_spec):
    data = expert_file_bytes(tiny_spec, metadata={"config": '{"note": "' + "x" * 5000 + '"}'})
    with pytest.raises(
        artifact.ArtifactError, match="'config' is 5012 bytes, over the limit of 4096"
    ):
        check(data, tiny_spec, max_config_bytes=4096)
    header_len = struct.unpack("<Q", data[:8])[0]
    with pytest.raises(
        artifact.ArtifactError, match=f"header is {header_len} bytes, over the limit"
    ):
        artifact.read_header(io.BytesIO(data), len(data), max_header_bytes=header_len - 1)
    check(data, tiny_spec, max_config_bytes=5012)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(tiny_spec, monkeypatch, dtype, bad):
    # Small chunks: the bad value sits in a later chunk of a tensor than the first.
    monkeypatch.setattr(artifact, "FINITE_CHECK_CHUNK", 64)
    soft = torch.randn(4, tiny_spec.hidden_size).to(dtype)
    soft[3, 17] = bad
    data = expert_file_bytes(tiny_spec, tensors={"soft_tokens": soft})
    header = check(data, tiny_spec)  # the header alone is fine
    with pytest.raises(artifact.ArtifactError, match="tensor 'soft_tokens' has NaN or infinite"):
        artifact.check_finite(io.BytesIO(data), header)


def test_finite_values_pass_the_value_check(tiny_spec):
    data = expert_file_bytes(tiny_spec)
    artifact.check_finite(io.BytesIO(data), check(data, tiny_spec))
