"""Held-out perplexity of the next ``ahead`` tokens, base vs augmented, per ahead position.

The held-out set is a fixed, seeded list of (window, position) pairs, so every expert trained
on a corpus is measured on the same tokens as the plain decoder and as each other.
"""

import math
import time
from dataclasses import dataclass

import torch

from .expert import augmented_forward
from .objective import ahead_losses, position_batch


@dataclass(frozen=True)
class HeldOut:
    windows: torch.Tensor  # (W, T)
    positions: torch.Tensor  # (W, K) first target index per pair
    ahead: int

    @property
    def pairs(self):
        return self.positions.numel()


POSITIONS_PER_WINDOW = 4  # seeded (window, position) pairs per held-out window


def heldout_set(
    token_ids,
    *,
    window=256,
    ahead=16,
    positions_per_window=POSITIONS_PER_WINDOW,
    max_windows=32,
    min_prefix=16,
    seed=1234,
):
    """Non-overlapping windows of the held-out text with seeded positions in each."""
    n_windows = min(max_windows, len(token_ids) // window)
    if n_windows == 0:
        raise ValueError(f"held-out text has {len(token_ids)} tokens, fewer than one window")
    generator = torch.Generator().manual_seed(seed)
    windows = token_ids[: n_windows * window].reshape(n_windows, window)  # (W, T)
    choices = window - ahead - min_prefix + 1
    picks = torch.stack(
        [
            torch.randperm(choices, generator=generator)[:positions_per_window]
            for _ in range(n_windows)
        ]
    )
    return HeldOut(windows=windows, positions=picks + min_prefix, ahead=ahead)


@torch.no_grad()
def evaluate(decoder, expert, heldout, *, batch_windows=4, include_base=True):
    """Perplexity per ahead position and overall, for plain D and (if given) D + expert, and
    the seconds each spent in its forward passes (the two alternate batch by batch, so a
    busy machine slows both alike: their ratio is the expert's latency overhead)."""
    device = next(decoder.parameters()).device
    sums = {"base": torch.zeros(heldout.ahead), "augmented": torch.zeros(heldout.ahead)}
    seconds = {"base": 0.0, "augmented": 0.0}
    rows = 0
    models = {"base": None, "augmented": expert}
    if not include_base:
        del models["base"]
    if expert is None:
        del models["augmented"]
    if not models:
        raise ValueError("nothing to evaluate: no expert, and the plain decoder left out")
    for start in range(0, len(heldout.windows), batch_windows):
        windows = heldout.windows[start : start + batch_windows].to(device)
        positions = heldout.positions[start : start + batch_windows].to(device)
        for name, model in models.items():
            started = time.perf_counter()
            # A static prefix changes the windows' own cache: one prefill per model.
            past, past_bias, tokens, targets, starts = position_batch(
                decoder, windows, positions, heldout.ahead, getattr(model, "prefix", None)
            )
            logits = augmented_forward(
                decoder, model, past=past, past_bias=past_bias, tokens=tokens, positions=starts
            )
            sums[name] += ahead_losses(logits, targets).sum(0).cpu()  # .cpu() waits for it
            seconds[name] += time.perf_counter() - started
        rows += tokens.shape[0]
    names = [n for n, on in (("base", include_base), ("augmented", expert is not None)) if on]
    return _report(sums, seconds, rows, names)


def _report(sums, seconds, rows, names):
    report = {"pairs": rows, "positions": len(sums["base"])}
    for name in names:
        mean = sums[name] / rows
        report[name] = {
            "ppl": math.exp(mean.mean().item()),
            "ppl_by_position": [round(math.exp(x), 4) for x in mean.tolist()],
            "seconds": seconds[name],
        }
    if len(names) == 2:
        base, aug = report["base"]["ppl"], report["augmented"]["ppl"]
        report["reduction_pct"] = 100 * (base - aug) / base
        report["latency_ratio"] = seconds["augmented"] / max(seconds["base"], 1e-9)
    return report
