"""Inference overhead of an expert: augmented vs plain generation, and the coprocessor alone.

A 256-token prompt from the held-out text, 32 greedy new tokens, an expert of the default shape
(N_L latents and N_P static prefix positions, what a job trains: TrainConfig's); it is untrained
but computes exactly what a trained one does. Each variant runs
--repeats times after a warm-up; medians are reported.

    python bench/overhead.py [--repeats 5]

Ends with RESULT overhead_ratio=<augmented/plain> coprocessor_ms=<ms>.
"""

import statistics
import time

import torch
from common import corpus_ids, parse, parser, setup, space_token

from coprocessor.decoder import prefill
from coprocessor.expert import Coprocessor, CoprocessorConfig
from coprocessor.generate import Request, generate
from coprocessor.train import TrainConfig


def main():
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    defaults = TrainConfig().expert  # what a job trains
    p.add_argument("--n-latents", type=int, default=defaults.n_latents)
    p.add_argument("--prefix-positions", type=int, default=defaults.prefix_positions)
    args = parse(p, smoke=dict(repeats=1, prompt_tokens=48, new_tokens=4))
    model, tokenizer = setup(args)
    _, heldout_ids = corpus_ids(args, tokenizer)
    prompt = heldout_ids[: args.prompt_tokens].tolist()
    expert = (
        Coprocessor(
            model,
            CoprocessorConfig(
                n_latents=args.n_latents,
                prefix_positions=args.prefix_positions,
                anchor_token_id=space_token(tokenizer),
            ),
        )
        .to(args.device)
        .eval()
    )

    def run(with_expert):
        request = Request(
            prompt,
            expert=expert if with_expert else None,
            max_new_tokens=args.new_tokens,
            stop_ids=(),
        )
        output = generate(model, [request])[0]
        assert len(output.token_ids) == args.new_tokens
        return output

    def coprocessor_step():
        if not expert.has_coprocessor:
            return 0.0
        ids = torch.tensor([prompt[:-1]], device=args.device)
        past, past_bias, positions, _ = prefill(model, ids, torch.ones_like(ids, dtype=torch.bool))
        started = time.perf_counter()
        with torch.no_grad():
            expert.latents(past, past_bias, positions)
        return time.perf_counter() - started

    plain, augmented, steps = [], [], []
    run(False), run(True), coprocessor_step()  # warm-up
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        plain.append(timed(lambda: run(False)))
        augmented.append(timed(lambda: run(True)))
        steps.append(coprocessor_step())
    plain_s, augmented_s = statistics.median(plain), statistics.median(augmented)
    step_ms = 1000 * statistics.median(steps)
    print(
        f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {args.n_latents} latents, "
        f"{args.prefix_positions} prefix positions, "
        f"{args.repeats} repeats, device {args.device}"
    )
    print(f"{'plain generation':28} {1000 * plain_s:9.1f} ms")
    print(f"{'augmented generation':28} {1000 * augmented_s:9.1f} ms")
    print(f"{'coprocessor step alone':28} {step_ms:9.1f} ms")
    print(f"RESULT overhead_ratio={augmented_s / plain_s:.3f} coprocessor_ms={step_ms:.1f}")


def timed(function):
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
