"""The augmented forward: exact plain behaviour, correct positions and masks, LoRA = PEFT."""

import copy
import json
import threading

import pytest
import torch

from coprocessor import artifact
from coprocessor.decoder import prefill
from coprocessor.evaluate import evaluate, heldout_set
from coprocessor.expert import Coprocessor, CoprocessorConfig, augmented_forward
from tests.factories import FAMILIES, VOCAB, frozen, phrase_corpus, randomize


@pytest.mark.parametrize("family", FAMILIES)
def test_the_decoder_stays_bit_for_bit_plain_outside_an_expert(family):
    model = frozen(FAMILIES[family])
    ids = torch.randint(0, VOCAB, (2, 12))
    before = model(ids).logits
    expert = randomize(Coprocessor(model, CoprocessorConfig(n_latents=3, lora_rank=2)))
    assert torch.equal(model(ids).logits, before)
    with expert.active():
        assert not torch.equal(model(ids).logits, before)
    assert torch.equal(model(ids).logits, before)


def test_an_active_expert_in_one_thread_is_invisible_to_another():
    model = frozen(FAMILIES["llama"])
    ids = torch.randint(0, VOCAB, (1, 12))
    before = model(ids).logits
    expert = randomize(Coprocessor(model, CoprocessorConfig(n_latents=3, lora_rank=2)))
    inside, seen = threading.Event(), []

    def other_request():
        inside.wait()
        seen.append(model(ids).logits)

    thread = threading.Thread(target=other_request)
    thread.start()
    with expert.active():
        inside.set()
        thread.join()
    assert torch.equal(seen[0], before)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_continuation_with_padding_matches_a_full_forward(family):
    """Left-padded rows with explicit positions and masks give the plain model's logits."""
    model = frozen(FAMILIES[family])
    long, short = torch.randint(0, VOCAB, (14,)), torch.randint(0, VOCAB, (9,))
    prefix = torch.zeros(2, 10, dtype=torch.long)
    visible = torch.zeros(2, 10, dtype=torch.bool)
    prefix[0], visible[0] = long[:10], True
    prefix[1, 5:], visible[1, 5:] = short[:5], True
    past, past_bias, positions, _ = prefill(model, prefix, visible)
    tokens = torch.stack([long[10:14], short[5:9]])
    logits = augmented_forward(
        model, None, past=past, past_bias=past_bias, tokens=tokens, positions=positions
    )
    torch.testing.assert_close(logits[0], model(long[None]).logits[0, 10:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], model(short[None]).logits[0, 5:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_untrained_expert_does_no_harm(family):
    model = frozen(FAMILIES[family])
    heldout = heldout_set(
        phrase_corpus(length=1200, seed=3), window=48, ahead=4, positions_per_window=4, min_prefix=4
    )
    report = evaluate(model, Coprocessor(model, CoprocessorConfig(n_latents=8)), heldout)
    harm = (report["augmented"]["ppl"] - report["base"]["ppl"]) / report["base"]["ppl"]
    assert abs(harm) < 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_part_of_the_expert_and_none_the_decoder(family):
    model = frozen(FAMILIES[family])
    expert = Coprocessor(model, CoprocessorConfig(n_latents=3, lora_rank=2))
    with torch.no_grad():
        expert.latent_head.proj.weight.normal_(0, 0.1)  # let gradients past the zero init
        for b in expert.lora_b:
            b.normal_(0, 0.1)
    ids = torch.randint(0, VOCAB, (2, 10))
    past, past_bias, positions, _ = prefill(model, ids[:, :6], torch.ones(2, 6, dtype=torch.bool))
    logits = augmented_forward(
        model, expert, past=past, past_bias=past_bias, tokens=ids[:, 6:], positions=positions
    )
    logits.logsumexp(-1).sum().backward()
    for name, p in expert.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_tensors_load_into_peft_and_match(family, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = frozen(FAMILIES[family])
    expert = randomize(Coprocessor(model, CoprocessorConfig(n_latents=2, lora_rank=4)))
    path = tmp_path / "e.safetensors"
    expert.save(path, base_fingerprint="f" * 64)
    tensors, metadata = artifact.load_expert(path)

    peft_model = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(
            r=int(metadata["lora_rank"]),
            lora_alpha=float(metadata["lora_alpha"]),
            target_modules=json.loads(metadata["lora_target_modules"]),
            fan_in_fan_out=family == "gpt2",
        ),
    )
    lora = {k: v for k, v in tensors.items() if ".lora_" in k}
    result = set_peft_model_state_dict(peft_model, lora)
    assert not [k for k in result.unexpected_keys if "lora" in k]
    ids = torch.randint(0, VOCAB, (1, 9))
    with expert.active():
        ours = model(ids).logits
    torch.testing.assert_close(peft_model(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_a_saved_expert_reloads_to_the_same_outputs(tmp_path):
    model = frozen(FAMILIES["qwen2"])
    expert = randomize(Coprocessor(model, CoprocessorConfig(n_latents=3, lora_rank=2)))
    path = tmp_path / "e.safetensors"
    expert.save(path, base_fingerprint="f" * 64, training={"steps": 3})
    again = Coprocessor.load(model, path)
    ids = torch.randint(0, VOCAB, (1, 10))
    past, past_bias, positions, _ = prefill(model, ids[:, :6], torch.ones(1, 6, dtype=torch.bool))
    args = dict(past=past, past_bias=past_bias, tokens=ids[:, 6:], positions=positions)
    torch.testing.assert_close(
        augmented_forward(model, again, **args),
        augmented_forward(model, expert, **args),
    )


def test_a_full_expert_trains_its_own_copy_and_round_trips(tmp_path):
    model = frozen(FAMILIES["llama"])
    expert = Coprocessor(model, CoprocessorConfig(n_latents=2, kind="full"))
    assert all(p.requires_grad for p in expert.full.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    path = tmp_path / "full.safetensors"
    expert.save(path, base_fingerprint="f" * 64)
    again = Coprocessor.load(model, path)
    assert again.config.kind == "full"
