"""Stopping in time: a validation slice, a reference text, the best checkpoint.

A run's budget is a maximum. ``train`` holds out the tail of its tokens
(``TrainConfig.validation_fraction``) and measures the expert on it ``evaluations`` times over
the run, and on a reference text: a page of plain English on everyday topics
(``data/reference.txt``, written for this), on which the expert's change in perplexity is its
off-domain harm. The best measurement whose harm is within ``harm_bound_pct`` keeps a copy of
the expert; the run stops after ``patience`` measurements without a validation gain worth
counting (``min_improvement``) made with the harm within the bound or falling toward it, and
returns the kept copy. When no measurement stays within the bound, the one that harmed least
is kept and the run says so.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .objective import packed_losses, window_cache

REFERENCE_TEXT = Path(__file__).parent / "data" / "reference.txt"


def reference_ids(tokenizer):
    """The reference text's token ids (1-D), for ``train(reference_ids=...)``."""
    ids = tokenizer(REFERENCE_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    return torch.tensor(ids["input_ids"], dtype=torch.long)


@dataclass
class Measurement:
    step: int
    elapsed_s: float
    validation_loss: float
    reduction_pct: float  # validation perplexity against plain D's (positive: better)
    harm_pct: float  # reference-text perplexity against plain D's (positive: worse)

    def to_dict(self):
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class Watch:
    """Measures an expert during training and decides when to stop (see the module)."""

    def __init__(self, decoder, config, validation, reference):
        self.decoder, self.config = decoder, config
        self.validation, self.reference = validation, reference  # (W, T) windows each
        self.plain = {
            "validation": self._loss(None, validation),
            "reference": self._loss(None, reference),
        }
        self.curve = []  # Measurement per check, the untrained expert's first
        self.best = self.safest = None  # Measurement
        self.best_state = self.safest_state = None
        self.counted_loss = None  # the validation loss of the last improvement that counted
        self.since_best = 0  # checks since then
        self.checks_done = 0

    @classmethod
    def split(cls, token_ids, config):
        """(training ids, validation ids or None, why there is no validation slice or "")."""
        if not config.evaluations:
            return token_ids, None, "no validation was asked for"
        window = config.window
        held = max(int(len(token_ids) * config.validation_fraction), window)
        held = min(held, config.validation_windows * window)
        held -= held % window  # whole windows
        needed = window + config.teacher_context * (config.objective != "next_token")
        if len(token_ids) - held < needed + window:
            return (
                token_ids,
                None,
                (
                    f"the corpus ({len(token_ids)} tokens) is too small to hold out a validation "
                    f"slice of {window} tokens"
                ),
            )
        return token_ids[:-held], token_ids[-held:], ""

    @classmethod
    def start(cls, decoder, config, validation_ids, reference_ids):
        """A Watch over windows of the validation slice and of the reference text."""
        return cls(
            decoder,
            config,
            _windows(validation_ids, config.window),
            _windows(reference_ids, config.window),
        )

    # --- when ---------------------------------------------------------------------------

    def due(self, step, elapsed_s):
        """Whether the next check is due: the untrained expert first, then evenly over the
        run, by whichever of the steps and the time budget will end it first."""
        done, total = self.checks_done, self.config.evaluations
        if done == 0:
            return True
        progress = step / max(self.config.steps, 1)
        if self.config.time_budget_s:
            progress = max(progress, elapsed_s / self.config.time_budget_s)
        return progress >= done / total

    def should_stop(self):
        return self.since_best >= self.config.patience

    # --- measuring ----------------------------------------------------------------------

    def check(self, expert, step, elapsed_s):
        """Measure ``expert`` now, keep a copy if it is the best so far; returns the
        Measurement."""
        validation = self._loss(expert, self.validation)
        reference = self._loss(expert, self.reference)
        measured = Measurement(
            step=step,
            elapsed_s=elapsed_s,
            validation_loss=validation,
            reduction_pct=100 * (1 - math.exp(validation - self.plain["validation"])),
            harm_pct=100 * (math.exp(reference - self.plain["reference"]) - 1),
        )
        self.curve.append(measured)
        self.checks_done += 1
        if step == 0:  # the untrained expert: where the curve starts, never what is kept
            return measured
        if self.safest is None or measured.harm_pct < self.safest.harm_pct:
            self.safest, self.safest_state = measured, _copy(expert)
        eligible = measured.harm_pct <= self.config.harm_bound_pct
        if eligible and (self.best is None or validation < self.best.validation_loss):
            self.best, self.best_state = measured, _copy(expert)
        # Patience runs out unless the validation gain since the last counted one is worth the
        # time, with the harm within the bound or falling toward it (an initial prefix can
        # start above it on a small corpus, and training brings it down).
        counted = self.counted_loss is None or validation < self.counted_loss * (
            1 - self.config.min_improvement
        )
        falling = len(self.curve) > 1 and measured.harm_pct < self.curve[-2].harm_pct
        if counted and (eligible or falling):
            self.counted_loss, self.since_best = validation, 0
        else:
            self.since_best += 1
        return measured

    @torch.no_grad()
    def _loss(self, expert, windows, batch=4):
        """Mean next-token loss over the windows' tokens, with the expert's static prefix (or
        coprocessor, at seeded points) or, with None, plain D on the same tokens."""
        device = next(self.decoder.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(windows), batch):
            part = windows[start : start + batch].to(device)
            if expert is not None and expert.prefix is None:
                losses = packed_losses(
                    self.decoder, expert, part, self._points(part), self.config.ahead_tokens
                )
            elif expert is not None:
                losses = window_cache(self.decoder, expert.prefix, part).losses
            elif self._prefix_kind:
                logits = self.decoder(input_ids=part, use_cache=False).logits[:, :-1]
                losses = F.cross_entropy(
                    logits.float().transpose(1, 2), part[:, 1:], reduction="none"
                )
            else:
                losses = packed_losses(
                    self.decoder, None, part, self._points(part), self.config.ahead_tokens
                )
            total += losses.sum().item()
            count += losses.numel()
        return total / count

    @property
    def _prefix_kind(self):
        return bool(self.config.expert.prefix_positions)

    def _points(self, windows):
        """Seeded augmentation points, the same at every check."""
        config = self.config
        choices = config.window - config.ahead_tokens - config.min_prefix + 1
        generator = torch.Generator().manual_seed(1234)
        picks = [
            torch.randperm(choices, generator=generator)[: config.positions_per_window]
            for _ in range(len(windows))
        ]
        return torch.stack(picks).to(windows.device) + config.min_prefix

    # --- the outcome --------------------------------------------------------------------

    def restore(self, expert):
        """Load the kept copy into ``expert``; returns the kept Measurement (None if no
        trained check ran)."""
        kept, state = self.kept()
        if state is not None:
            expert.load_state_dict(state)
        return kept

    def kept(self):
        if self.best is not None:
            return self.best, self.best_state
        return self.safest, self.safest_state

    @property
    def within_bound(self):
        return self.best is not None

    def summary(self, stopped):
        """What the run's owner reads: why it stopped and what it kept."""
        kept, _ = self.kept()
        bound = self.config.harm_bound_pct
        if kept is None:
            return "stopped before its first check: the expert is as it ended"
        why = {
            "plateau": f"the validation loss stopped improving for {self.config.patience} checks",
            "harm": f"the last {self.config.patience} checks harmed other text by over {bound:g}%",
            "time": "the time budget ran out",
            "done": "all its steps ran",
        }.get(stopped, stopped)
        said = (
            f"stopped at step {self.curve[-1].step}: {why}; kept step {kept.step} "
            f"({kept.reduction_pct:.1f}% lower validation perplexity, {kept.harm_pct:+.2f}% "
            "on the reference text)"
        )
        if not self.within_bound:
            said += (
                f". No checkpoint stayed within the {bound:g}% bound on other text: the one "
                "that harmed it least is kept. A small or very distinctive corpus makes the "
                "expert fit its own windows; more text, or a shorter budget, helps"
            )
        return said

    def stop_reason(self):
        """ "harm" when the checks since the best were over the bound, else "plateau"."""
        recent = self.curve[-self.config.patience :]
        over = all(m.harm_pct > self.config.harm_bound_pct for m in recent)
        return "harm" if over else "plateau"

    # --- checkpoints --------------------------------------------------------------------

    def state_dict(self):
        return {
            "curve": [asdict(m) for m in self.curve],
            "best": self.best and asdict(self.best),
            "safest": self.safest and asdict(self.safest),
            "best_state": self.best_state,
            "safest_state": self.safest_state,
            "counted_loss": self.counted_loss,
            "since_best": self.since_best,
            "checks_done": self.checks_done,
        }

    def load_state_dict(self, state):
        self.curve = [Measurement(**m) for m in state["curve"]]
        self.best = state["best"] and Measurement(**state["best"])
        self.safest = state["safest"] and Measurement(**state["safest"])
        self.best_state, self.safest_state = state["best_state"], state["safest_state"]
        self.counted_loss = state["counted_loss"]
        self.since_best, self.checks_done = state["since_best"], state["checks_done"]


def _copy(expert):
    return {k: v.detach().to("cpu", copy=True) for k, v in expert.state_dict().items()}


def _windows(ids, window):
    """Whole non-overlapping windows (W, T) of ``ids`` (one shorter window if none fits)."""
    window = min(window, len(ids))
    return ids[: len(ids) // window * window].view(-1, window)
