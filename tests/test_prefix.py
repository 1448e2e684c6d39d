"""The static part of an expert: a learned key/value prefix per layer (coprocessor.prefix)."""

import dataclasses

import pytest
import torch

from coprocessor import artifact, base_models, hub
from coprocessor.evaluate import HeldOut, evaluate
from coprocessor.expert import Coprocessor, CoprocessorConfig, augmented_forward
from coprocessor.generate import Request, generate
from coprocessor.objective import ahead_losses, packed_losses, position_batch, window_cache
from coprocessor.train import TrainConfig, loss_tokens_per_step, own_text, prefix_text, train
from tests.factories import FAMILIES, frozen, phrase_corpus, prefix_expert, randomize


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_mixing_prefixes_latents_and_plain_rows_equals_each_request_alone(family):
    model = frozen(FAMILIES[family])
    short = prefix_expert(model, positions=2, seed=1)
    both = prefix_expert(model, positions=5, n_latents=3, seed=2)
    latents = randomize(Coprocessor(model, CoprocessorConfig(n_latents=2, lora_rank=2)), 3)
    requests = [
        Request([3, 8, 1, 9, 14, 2], expert=short, max_new_tokens=7),
        Request([7, 7], expert=None, max_new_tokens=5),
        Request([12, 5, 33], expert=both, max_new_tokens=7),
        Request([1, 2, 3, 4], expert=both, max_new_tokens=7, temperature=0.9, seed=42),
        Request([9], expert=latents, max_new_tokens=4),
        Request([4, 6], expert=short, max_new_tokens=6, temperature=1.2, top_p=0.9, seed=7),
    ]
    batched = [o.token_ids for o in generate(model, requests)]
    alone = [generate(model, [r])[0].token_ids for r in requests]
    assert batched == alone


def test_a_prefix_changes_what_is_generated():
    model = frozen(FAMILIES["llama"])
    prompt = [3, 8, 1, 9, 14, 2]
    plain = generate(model, [Request(prompt, max_new_tokens=8)])[0].token_ids
    expert = prefix_expert(model, positions=4)
    assert generate(model, [Request(prompt, expert, 8)])[0].token_ids != plain


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_hidden_prefix_leaves_the_decoder_exactly_as_it_was(family):
    """The prompt's positions start after the prefix; rotary attention depends on distances
    only, so with every prefix column hidden the logits are plain D's."""
    model = frozen(FAMILIES[family])
    expert = prefix_expert(model, positions=6)
    with torch.no_grad():
        expert.prefix.gate.fill_(-1e9)
    windows = phrase_corpus(length=64)[None]
    positions = torch.tensor([[20, 31, 40]])
    plain = evaluate(model, None, heldout(windows, positions))["base"]["ppl"]
    hidden = evaluate(model, expert, heldout(windows, positions), include_base=False)
    assert hidden["augmented"]["ppl"] == pytest.approx(plain, rel=1e-5)


def heldout(windows, positions):
    return HeldOut(windows=windows, positions=positions, ahead=4)


@pytest.mark.parametrize("n_latents", [0, 2])
def test_packed_training_losses_equal_one_row_per_point_with_a_prefix(n_latents):
    model = frozen(FAMILIES["llama"])
    expert = prefix_expert(model, positions=3, n_latents=n_latents)
    windows = torch.stack([phrase_corpus(length=48, seed=s)[:40] for s in (1, 2)])
    positions = torch.tensor([[18, 25, 30], [20, 22, 33]])
    past, bias, tokens, targets, starts = position_batch(
        model, windows, positions, 4, expert.prefix
    )
    rows = augmented_forward(
        model, expert, past=past, past_bias=bias, tokens=tokens, positions=starts
    )
    cache = window_cache(model, expert.prefix, windows)
    if n_latents:
        packed = packed_losses(model, expert, windows, positions, 4, cache)
        torch.testing.assert_close(
            packed.reshape(-1, 4), ahead_losses(rows, targets), atol=1e-5, rtol=1e-5
        )
    # The windows' own losses read the prefix too: equal to the rows' first ahead position
    # over the same cache without latents.
    plain = augmented_forward(
        model, None, past=past, past_bias=bias, tokens=tokens, positions=starts
    )
    first = cache.losses[torch.arange(2)[:, None], positions - 1].reshape(-1)
    torch.testing.assert_close(first, ahead_losses(plain, targets)[:, 0], atol=1e-5, rtol=1e-5)


def test_training_a_prefix_lowers_the_loss_and_never_moves_the_sink():
    model = frozen(FAMILIES["llama"])
    corpus = phrase_corpus(length=3000)
    config = TrainConfig.from_settings(
        dict(
            n_latents=0,
            prefix_positions=8,
            prefix_gate_init=-4.0,
            window=32,
            ahead_tokens=4,
            positions_per_window=4,
            windows_per_step=2,
            steps=30,
            warmup_steps=2,
            prefix_lr=5e-2,
            gate_lr=1e-1,
            evaluations=0,  # the whole corpus is the training text
        )
    )
    expert = Coprocessor(model, config.expert)
    result = train(model, corpus, config, expert=expert)
    prefix = result.expert.prefix
    assert result.history[-1][2] < result.history[0][2]
    assert prefix.gate[0].item() == 0.0  # the sink is always visible
    assert (prefix.gate[1:] != -4.0).all()  # the other gates learned
    # The sink is D's own first-position cache over the init text, untouched by training.
    initial = Coprocessor(model, config.expert).prefix
    initial.initialize_from(model, prefix_text(corpus, config, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(prefix.keys[:, :, :1], initial.keys[:, :, :1])
    assert not torch.allclose(prefix.keys[:, :, 1:], initial.keys[:, :, 1:])


def test_an_untrained_prefix_is_the_sink_alone():
    """Every position but the sink starts behind a closed gate."""
    model = frozen(FAMILIES["llama"])
    expert = Coprocessor(
        model, CoprocessorConfig(n_latents=0, prefix_positions=5, prefix_gate_init=-4)
    )
    assert expert.prefix.gate.tolist() == [0.0, -4.0, -4.0, -4.0, -4.0]


# --- the expert file ------------------------------------------------------------------------


@pytest.fixture
def llama_spec():
    model = frozen(FAMILIES["llama"])
    return model, base_models.describe(model)


@pytest.mark.parametrize("n_latents", [0, 2])
def test_a_prefix_expert_round_trips_through_its_file(llama_spec, tmp_path, n_latents):
    model, spec = llama_spec
    expert = prefix_expert(model, positions=4, n_latents=n_latents)
    path = tmp_path / "e.safetensors"
    expert.save(path, spec.fingerprint)
    header = artifact.read_header_from_path(path)
    artifact.validate(header, spec)
    assert header.metadata["format"] == "latentry.coprocessor/2"
    assert header.kind == ("prefix" if n_latents == 0 else "lora")
    assert header.prefix_positions == 4
    loaded = Coprocessor.from_bytes(model, path.read_bytes(), spec)
    prompt = [3, 8, 1, 9]
    (ours,) = generate(model, [Request(prompt, loaded, 6)])
    assert ours.token_ids == generate(model, [Request(prompt, expert, 6)])[0].token_ids


def test_a_format_1_file_still_loads(llama_spec, tmp_path):
    model, spec = llama_spec
    expert = randomize(Coprocessor(model, CoprocessorConfig(n_latents=2, lora_rank=2)))
    tensors, metadata = expert.expert_tensors(), expert.expert_metadata(spec.fingerprint)
    metadata["format"] = "latentry.coprocessor/1"
    del metadata["prefix_positions"]
    path = tmp_path / "old.safetensors"
    artifact.save_expert(path, tensors, metadata)
    artifact.validate(artifact.read_header_from_path(path), spec)
    assert Coprocessor.from_bytes(model, path.read_bytes(), spec).prefix is None


def prefix_file(tmp_path, spec, model, *, tensors=None, metadata=None, n_latents=0):
    expert = prefix_expert(model, positions=4, n_latents=n_latents)
    made = {**expert.expert_tensors(), **(tensors or {})}
    meta = {**expert.expert_metadata(spec.fingerprint), **(metadata or {})}
    path = tmp_path / "bad.safetensors"
    artifact.save_expert(path, {k: v for k, v in made.items() if v is not None}, meta)
    return artifact.read_header_from_path(path)


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({"prefix.keys": torch.zeros(2, 2, 4, 9)}, None, "prefix.keys has 2 heads of 9"),
        (
            {"prefix.values": torch.zeros(2, 2, 3, 8)},
            None,
            r"expected \[2, kv_heads, 4, head_dim\]",
        ),
        ({"prefix.keys": torch.zeros(3, 2, 4, 8)}, None, r"prefix.keys has shape \[3, 2, 4, 8\]"),
        ({"prefix.gate": torch.zeros(5)}, None, r"prefix.gate has shape \[5\], expected \[4\]"),
        ({"prefix.gate": None}, None, "needs the tensors prefix.keys, prefix.values, prefix.gate"),
        (None, {"prefix_positions": "0"}, "a prefix expert needs n_latents 0 and prefix_positions"),
        (None, {"prefix_positions": "9999"}, "prefix_positions must be an integer from 0 to 256"),
        (None, {"kind": "lora"}, "n_latents must be an integer from 1 to 64"),
        ({"soft_tokens": torch.zeros(2, 32)}, None, "unexpected tensor 'soft_tokens' for a prefix"),
    ],
)
def test_the_artifact_check_names_what_is_wrong_with_a_prefix(
    llama_spec, tmp_path, tensors, metadata, message
):
    model, spec = llama_spec
    header = prefix_file(tmp_path, spec, model, tensors=tensors, metadata=metadata)
    with pytest.raises(artifact.ArtifactError, match=message):
        artifact.validate(header, spec)


def test_without_known_heads_the_check_uses_the_key_projection(llama_spec, tmp_path):
    model, spec = llama_spec
    registry_spec = dataclasses.replace(spec, kv_heads=0, head_dim=0)
    header = prefix_file(tmp_path, spec, model, tensors={"prefix.keys": torch.zeros(2, 1, 4, 8)})
    with pytest.raises(
        artifact.ArtifactError, match="1 x 8 key features, the base model's keys have 16"
    ):
        artifact.validate(header, registry_spec)


# --- PEFT interop -----------------------------------------------------------------------------


# PEFT 0.21's cartridge forward passes past_key_values=, which transformers 5.24 deprecates;
# our own passes use cache= (docs/method.md, "Library pitfalls").
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_the_exported_prefix_loads_as_a_peft_cartridge_with_the_same_logits(tmp_path):
    """With the gates open (PEFT has none), PEFT's cartridge computes what we compute."""
    from peft import PeftModel

    model = frozen(FAMILIES["llama"])
    base_folder = tmp_path / "base"
    model.save_pretrained(base_folder)
    expert = prefix_expert(model, positions=4)
    path = tmp_path / "e.safetensors"
    expert.save(path, base_models.fingerprint(model))
    folder = hub.export_folder(path, tmp_path / "out", name="p", base_model_source=str(base_folder))
    peft_model = PeftModel.from_pretrained(frozen(FAMILIES["llama"]), folder)
    ids = torch.tensor([[3, 8, 1, 9, 14]])
    # Ours: the logits at x[3] (predicting x[4]) over the prefix and x[:3].
    past, bias, tokens, _, starts = position_batch(
        model, ids, torch.tensor([[4]]), 1, expert.prefix
    )
    ours = augmented_forward(
        model, expert, past=past, past_bias=bias, tokens=tokens, positions=starts
    )
    theirs = peft_model(input_ids=ids[:, :4]).logits[:, -1]
    torch.testing.assert_close(theirs, ours[:, 0], atol=1e-5, rtol=1e-5)
    _, info, _ = hub.import_folder(folder)
    assert info["kind"] == "prefix" and info["prefix_positions"] == 4


def test_replay_windows_come_from_the_decoder_s_own_text():
    """The off-domain anchor: D's own samples, seeded, mixed into every step."""
    model = frozen(FAMILIES["llama"])
    config = TrainConfig.from_settings(
        dict(
            n_latents=0,
            prefix_positions=4,
            window=32,
            ahead_tokens=4,
            positions_per_window=2,
            windows_per_step=1,
            replay_windows=1,
            replay_pool=3,
            steps=3,
        )
    )
    text = own_text(model, config)
    assert text.shape == (3 * 33,)
    assert torch.equal(text, own_text(model, config))
    start = model.config.bos_token_id
    first = generate(model, [Request([start], max_new_tokens=32, temperature=1.0, seed=0)])[0]
    assert text[1:33].tolist() == first.token_ids
    result = train(model, phrase_corpus(length=500), config)
    assert result.steps == 3 and loss_tokens_per_step(config) == 2 * 31
