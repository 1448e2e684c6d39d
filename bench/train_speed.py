"""Training speed of the expert's objective vs a PEFT LoRA fine-tune, same windows.

Counts the tokens that carry loss: windows x positions x ahead for a coprocessor, plus windows x
(window - 1) for a static prefix (``train.loss_tokens_per_step``); windows x (window - 1) for
the fine-tune. Both run the same number of steps on the same batches, in the
same process, after a warm-up step each.

    python bench/train_speed.py [--steps 5]

Ends with RESULT train_speed_ratio=<expert/finetune loss tokens per second>.
"""

import time

import torch
from common import (
    add_expert_arguments,
    corpus_ids,
    parse,
    parser,
    peft_lora_copy,
    setup,
    train_config,
)

from coprocessor.expert import Coprocessor
from coprocessor.train import loss_tokens_per_step, make_optimizer, sample_windows, train_step


def main():
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=5)
    add_expert_arguments(p)
    args = parse(p, smoke=dict(steps=1, window=64, windows_per_step=2))
    model, tokenizer = setup(args)
    train_ids, _ = corpus_ids(args, tokenizer)
    config = train_config(args, tokenizer)
    print(f"settings: {config.to_dict()}")
    coprocessor_s = time_coprocessor(model, train_ids, config, args.steps, args.device)
    finetune_s = time_finetune(model, train_ids, config, args.steps, args.device)
    target_tokens = loss_tokens_per_step(config)
    finetune_tokens = config.windows_per_step * (config.window - 1)
    rows = [
        ("expert objective", target_tokens, coprocessor_s),
        ("PEFT LoRA fine-tune", finetune_tokens, finetune_s),
    ]
    print(f"\n{'':24} {'loss tokens/step':>16} {'s/step':>8} {'tokens/s':>9}")
    for name, tokens, seconds in rows:
        print(f"{name:24} {tokens:16d} {seconds:8.3f} {tokens / seconds:9.1f}")
    ratio = (target_tokens / coprocessor_s) / (finetune_tokens / finetune_s)
    print(f"RESULT train_speed_ratio={ratio:.3f}")


def time_coprocessor(model, train_ids, config, steps, device):
    expert = Coprocessor(model, config.expert).to(device).train()
    optimizer = make_optimizer(expert, config)
    generator = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    autocast = torch.bfloat16 if dev.type == "cuda" else None
    train_step(model, expert, train_ids, config, optimizer, generator, dev, autocast)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, expert, train_ids, config, optimizer, generator, dev, autocast)
    synchronize(device)
    return (time.perf_counter() - started) / steps


def time_finetune(model, train_ids, config, steps, device):
    tuned = peft_lora_copy(model, config.expert.lora_rank, config.expert.lora_alpha)
    tuned.train()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=5e-4)
    generator = torch.Generator().manual_seed(0)
    autocast = torch.device(device).type == "cuda"

    def step():
        windows = sample_windows(train_ids, config, config.windows_per_step, generator).windows
        windows = windows.to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = tuned(input_ids=windows, labels=windows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
