"""Routing profiles: where in the base model's own representation space a corpus lives.

An expert's profile is the mean of D's last hidden states over windows of its training text.
A prompt is compared with it through the same mean-pooling of the prompt's prefill, so choosing
an expert costs no model but D itself.
"""

import torch


@torch.no_grad()
def mean_hidden(decoder, token_ids, visible):
    """Mean of D's last hidden states over the visible tokens of each row: (B, H), float32."""
    out = decoder(input_ids=token_ids, attention_mask=visible.long(), output_hidden_states=True)
    hidden = out.hidden_states[-1].float()
    weights = visible.float().unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


@torch.no_grad()
def profile(decoder, token_ids, *, window=256, max_windows=64, batch=8):
    """The routing profile of a corpus (1-D LongTensor): list of hidden_size floats.

    Up to ``max_windows`` windows spread evenly over the corpus, so long corpora cost the same
    as short ones and every part of the corpus has a say.
    """
    device = next(decoder.parameters()).device
    window = min(window, len(token_ids))
    if window == 0:
        raise ValueError("cannot profile an empty corpus")
    count = min(max_windows, len(token_ids) // window)
    starts = torch.linspace(0, len(token_ids) - window, count).long()
    windows = torch.stack([token_ids[s : s + window] for s in starts.tolist()])
    total = None
    for chunk in windows.split(batch):
        chunk = chunk.to(device)
        means = mean_hidden(decoder, chunk, torch.ones_like(chunk, dtype=torch.bool)).sum(0)
        total = means if total is None else total + means
    return (total / count).cpu().tolist()
