"""Training: the objective learns, progress and cancellation work, resume is exact."""

import pytest
import torch

from coprocessor.evaluate import evaluate, heldout_set
from coprocessor.train import Cancelled, TrainConfig, train
from tests.factories import frozen, phrase_corpus, tiny_llama


def small_config(**overrides):
    settings = dict(
        n_latents=4,
        ahead_tokens=4,
        window=32,
        positions_per_window=4,
        windows_per_step=2,
        min_prefix=4,
        lora_rank=4,
        lora_alpha=8,
        steps=6,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=3,
        seed=7,
        evaluations=0,  # unwatched: these tests are about the loop itself (test_watch.py)
    )
    settings.update(overrides)
    return TrainConfig.from_settings(settings)


@pytest.fixture(scope="module")
def model():
    return frozen(tiny_llama)


@pytest.fixture(scope="module")
def corpus():
    return phrase_corpus(length=3000)


def expert_state(result):
    return {k: v.clone() for k, v in result.expert.state_dict().items()}


def test_progress_is_reported_every_step(model, corpus):
    seen = []
    result = train(model, corpus, small_config(steps=4), on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4]
    assert all(p.total == 4 and p.loss > 0 and p.tokens_per_s > 0 for p in seen)
    assert seen[-1].eta_s == 0
    assert result.stopped == "done" and result.steps == 4


def test_a_time_budget_makes_the_total_an_estimate_that_settles(model, corpus):
    seen = []
    config = small_config(steps=10_000, time_budget_s=1.0)
    result = train(model, corpus, config, on_progress=seen.append)
    assert all(p.estimated and p.step <= p.total < 10_000 for p in seen)
    # from the pace of the steps so far: the last estimates sit near the steps actually run
    assert abs(seen[-1].total - result.steps) <= max(2, result.steps // 4)
    train(model, corpus, small_config(steps=3), on_progress=seen.append)  # a step count rules
    assert not seen[-1].estimated and seen[-1].total == 3


def test_it_stops_when_asked_between_steps(model, corpus):
    seen = []
    with pytest.raises(Cancelled, match="step 2"):
        train(
            model,
            corpus,
            small_config(),
            on_progress=seen.append,
            should_stop=lambda: len(seen) >= 2,
        )
    assert len(seen) == 2


def test_a_time_budget_ends_the_run(model, corpus):
    result = train(model, corpus, small_config(steps=10_000, time_budget_s=0.5))
    assert result.stopped == "time"
    assert 0 < result.steps < 10_000


def test_an_interrupted_run_resumes_to_the_same_weights(model, corpus, tmp_path):
    whole = expert_state(train(model, corpus, small_config()))
    checkpoint = tmp_path / "ckpt.pt"
    saved = []
    with pytest.raises(Cancelled):
        train(
            model,
            corpus,
            small_config(),
            checkpoint_path=checkpoint,
            on_checkpoint=saved.append,
            should_stop=lambda: len(saved) >= 1,
        )
    assert saved == [checkpoint]
    resumed = train(model, corpus, small_config(), resume_from=checkpoint)
    assert resumed.steps == 6
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed.expert.state_dict()[name]), name


def test_training_lowers_held_out_perplexity(model):
    """A random decoder spreads its bets over 64 tokens; the domain uses 12. The latents must
    open their gate and carry that to the decoder's predictions."""
    corpus = phrase_corpus(length=6000, seed=1, vocab=12)
    heldout = heldout_set(
        phrase_corpus(length=1600, seed=2, vocab=12),
        window=32,
        ahead=4,
        positions_per_window=4,
        min_prefix=4,
    )
    config = small_config(steps=100, lr=1e-2, gate_lr=0.1, warmup_steps=5)
    result = train(model, corpus, config)
    report = evaluate(model, result.expert, heldout)
    assert report["reduction_pct"] > 5, report


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("with_expert", [False, True], ids=["plain", "expert"])
def test_packed_positions_give_the_same_losses_as_one_row_each(family, with_expert):
    """Training packs K points of a window after one shared cache; evaluation uses one row per
    point. Both must compute the same thing."""
    from coprocessor.expert import Coprocessor, CoprocessorConfig, augmented_forward
    from coprocessor.objective import ahead_losses, packed_losses, position_batch
    from tests.factories import FAMILIES, VOCAB, randomize

    model = frozen(FAMILIES[family])
    expert = None
    if with_expert:
        expert = randomize(Coprocessor(model, CoprocessorConfig(n_latents=3, lora_rank=2)))
    windows = torch.randint(0, VOCAB, (2, 40))
    positions = torch.tensor([[5, 20, 30], [10, 11, 33]])
    past, past_bias, tokens, targets, starts = position_batch(model, windows, positions, 4)
    logits = augmented_forward(
        model, expert, past=past, past_bias=past_bias, tokens=tokens, positions=starts
    )
    packed = packed_losses(model, expert, windows, positions, 4)
    torch.testing.assert_close(
        packed.reshape(-1, 4), ahead_losses(logits, targets), atol=1e-5, rtol=1e-5
    )
