"""Training objectives and stopping in time: context distillation, the validation slice, the
best checkpoint, the off-domain harm bound, and a run that resumes with all of it."""

import math

import pytest
import torch

from coprocessor.expert import Coprocessor, CoprocessorConfig
from coprocessor.objective import window_cache, window_losses
from coprocessor.train import Cancelled, TrainConfig, sample_windows, train
from coprocessor.watch import Watch
from tests.factories import frozen, phrase_corpus, tiny_llama


def prefix_config(**overrides):
    settings = dict(
        n_latents=0,
        prefix_positions=4,
        window=32,
        ahead_tokens=4,
        positions_per_window=4,
        windows_per_step=2,
        min_prefix=4,
        teacher_context=16,
        steps=12,
        warmup_steps=2,
        prefix_lr=5e-2,
        gate_lr=1e-1,
        checkpoint_every=4,
        evaluations=4,
        patience=2,
        validation_windows=2,
        replay_pool=2,  # D's own text is the reference when none is given
        seed=3,
    )
    settings.update(overrides)
    return TrainConfig.from_settings(settings)


@pytest.fixture(scope="module")
def model():
    return frozen(tiny_llama)


@pytest.fixture(scope="module")
def corpus():
    return phrase_corpus(length=3000, seed=5, vocab=12)


def test_an_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="objective must be one of next_token, distill, mix"):
        prefix_config(objective="guess")


def test_distillation_measures_how_far_the_student_is_from_d_reading_the_text_before(model, corpus):
    """The student is D with the prefix, the teacher D having read the text before the
    window. With nothing before it and a prefix closed but for its sink, the two nearly agree;
    the text before the window is what the student has to learn to stand in for."""
    closed = Coprocessor(model, CoprocessorConfig(n_latents=0, prefix_positions=4))
    closed.prefix.gate.data[1:] = -1e4  # the sink stays open: D's own first position
    sample = sample_windows(corpus, prefix_config(), 2, torch.Generator().manual_seed(0), 16)
    assert sample.contexts.shape == (2, 16) and sample.windows.shape == (2, 32)
    cache = window_cache(model, closed.prefix, sample.windows)
    alone = window_losses(model, cache, sample.windows, "distill", sample.contexts[:, :0])
    assert alone.shape == (2, 31)
    read = window_losses(model, cache, sample.windows, "distill", sample.contexts)
    assert (alone >= -1e-6).all() and (read >= -1e-6).all()
    assert read.mean() > 5 * alone.mean()
    # KL(teacher || student) of one token, written out.
    teacher = model(input_ids=torch.cat([sample.contexts, sample.windows], 1)).logits
    p = teacher[0, 16 + 3].log_softmax(-1)
    q = cache.logits[0, 3].log_softmax(-1)
    torch.testing.assert_close(read[0, 3], (p.exp() * (p - q)).sum(), atol=1e-5, rtol=1e-4)
    mixed = window_losses(model, cache, sample.windows, "mix", sample.contexts)
    torch.testing.assert_close(mixed, (cache.losses + read) / 2)


def test_the_text_before_each_window_is_the_corpus_just_before_it(corpus):
    sample = sample_windows(corpus, prefix_config(), 3, torch.Generator().manual_seed(1), 16)
    text = corpus.tolist()
    for context, window in zip(sample.contexts.tolist(), sample.windows.tolist(), strict=True):
        span = context + window
        starts = [i for i in range(len(text) - 47) if text[i : i + 48] == span]
        assert starts, "the context and its window are one stretch of the corpus"


@pytest.mark.parametrize("objective", ["distill", "mix"])
def test_distillation_trains_the_prefix_toward_the_teacher(model, corpus, objective):
    config = prefix_config(objective=objective, steps=25, evaluations=0)
    result = train(model, corpus, config)
    losses = [loss for _, _, loss in result.history]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_a_watched_run_measures_the_untrained_expert_first_and_keeps_the_best(model, corpus):
    checks = []
    result = train(model, corpus, prefix_config(patience=10), on_check=checks.append)
    assert [m.to_dict() for m in checks] == result.validation
    assert result.validation[0]["step"] == 0
    assert [m["step"] for m in result.validation][1:] == [3, 6, 9, 12]
    eligible = [m for m in result.validation[1:] if m["harm_pct"] <= 1.0]
    best = min(eligible, key=lambda m: m["validation_loss"])
    assert result.kept_step == best["step"] and result.within_harm_bound
    assert f"kept step {best['step']}" in result.summary
    # The returned expert is the kept one: measured again, it gives the kept figure.
    config = prefix_config()
    train_ids, validation_ids, _ = Watch.split(corpus, config)
    assert len(validation_ids) == 64 and len(train_ids) == len(corpus) - 64
    watch = Watch(model, config, validation_ids.view(-1, 32), validation_ids.view(-1, 32))
    measured = watch.check(result.expert, 1, 0.0)
    assert measured.validation_loss == pytest.approx(best["validation_loss"], abs=1e-4)


def test_a_run_that_stops_improving_stops_before_its_budget(model, corpus):
    # No improvement is ever large enough after the first: a plateau from the start.
    result = train(model, corpus, prefix_config(steps=40, evaluations=10, min_improvement=1.0))
    assert result.stopped == "plateau"
    assert result.steps < 40
    assert [m["step"] for m in result.validation] == [0, 4, 8, 12]
    best = min(result.validation[1:], key=lambda m: m["validation_loss"])
    assert result.kept_step == best["step"]  # the lowest is kept, counted or not
    assert "the validation loss stopped improving for 2 checks" in result.summary


def test_a_run_past_the_harm_bound_keeps_the_least_harmful_checkpoint_and_says_so(model, corpus):
    result = train(model, corpus, prefix_config(harm_bound_pct=-100.0))  # none can stay
    assert result.within_harm_bound is False
    trained = result.validation[1:]
    safest = min(trained, key=lambda m: m["harm_pct"])
    assert result.kept_step == safest["step"]
    assert "No checkpoint stayed within the -100% bound" in result.summary


def test_a_corpus_too_small_for_a_validation_slice_trains_unwatched_and_says_why(model):
    small = phrase_corpus(length=90, seed=2, vocab=12)
    result = train(model, small, prefix_config(steps=3))
    assert result.validation == [] and result.within_harm_bound is None
    assert "too small to hold out a validation slice" in result.summary


def test_an_interrupted_watched_run_resumes_to_the_same_kept_expert(model, corpus, tmp_path):
    config = prefix_config(objective="mix", patience=10)
    whole = train(model, corpus, config)
    checkpoint, saved = tmp_path / "ckpt.pt", []
    with pytest.raises(Cancelled):
        train(
            model,
            corpus,
            config,
            checkpoint_path=checkpoint,
            on_checkpoint=saved.append,
            should_stop=lambda: len(saved) >= 2,
        )
    resumed = train(model, corpus, config, resume_from=checkpoint)
    assert resumed.kept_step == whole.kept_step
    assert [m["step"] for m in resumed.validation] == [m["step"] for m in whole.validation]
    for name, tensor in whole.expert.state_dict().items():
        torch.testing.assert_close(tensor, resumed.expert.state_dict()[name], msg=name)


class Scripted(Watch):
    """A watch whose losses come from a script: (validation, reference) per check, plain D's
    0 on both, so that a loss of x reads as exp(x) - 1 in harm."""

    def __init__(self, config, script):
        self.script = iter(script)
        self.next = None
        super().__init__(None, config, torch.zeros(1, 32), torch.zeros(1, 32))

    def _loss(self, expert, windows):
        if expert is None:
            return 0.0
        if self.next is None:
            self.next = next(self.script)
            return self.next[0]
        reference, self.next = self.next[1], None
        return reference


def checks(watch, count):
    expert = Coprocessor(frozen(tiny_llama), CoprocessorConfig(n_latents=0, prefix_positions=2))
    stops = []
    for step in range(count):
        watch.check(expert, step, float(step))
        stops.append(watch.should_stop())
    return stops


def harm(pct):
    return math.log1p(pct / 100)


def test_harm_past_the_bound_but_falling_does_not_stop_a_run_that_improves():
    falling = [(2.0 - 0.05 * i, harm(2.0 - 0.3 * i)) for i in range(6)]  # +2.0% to +0.5%
    watch = Scripted(prefix_config(patience=2), falling)
    assert checks(watch, 6) == [False] * 6
    assert watch.kept()[0].step == 5 and watch.within_bound


def test_harm_past_the_bound_and_rising_stops_the_run_as_harm():
    rising = [(2.0 - 0.05 * i, harm(0.5 + 0.4 * i)) for i in range(6)]  # +0.5% to +2.5%
    watch = Scripted(prefix_config(patience=2), rising)
    assert checks(watch, 6) == [False, False, False, True, True, True]
    assert watch.stop_reason() == "harm"
    assert watch.kept()[0].step == 1  # the last within the bound (+0.9%)


def test_a_validation_loss_that_stops_falling_stops_the_run_as_a_plateau():
    watch = Scripted(prefix_config(patience=2), [(2.0, 0.0)] * 5)
    assert checks(watch, 5) == [False, False, False, True, True]
    assert watch.stop_reason() == "plateau"
