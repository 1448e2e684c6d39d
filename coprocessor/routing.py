"""Routing profiles: where in the base model's own representation space a corpus lives.

An expert's profile is the mean of D's last hidden states over windows of its training text.
A prompt is compared with it through the same mean-pooling of the prompt's own text, both
measured from a centre: the mean over plain text of no particular domain (``centre``), so
that what every text has in common does not count, whichever experts exist. Choosing an
expert costs no model but D itself.
"""

import torch
import torch.nn.functional as F

# The first position's hidden state (the attention sink) has a norm many times the others':
# in a short prompt's mean it would outweigh the words. Pooling starts after it.
SKIPPED_POSITIONS = 1


@torch.no_grad()
def mean_hidden(decoder, token_ids, visible):
    """Mean of D's last hidden states over the visible tokens of each row after the first
    ``SKIPPED_POSITIONS`` (all of a row that has no more): (B, H), float32."""
    out = decoder(input_ids=token_ids, attention_mask=visible.long(), output_hidden_states=True)
    hidden = out.hidden_states[-1].float()
    weights = visible.float()
    later = weights.clone()
    later[:, :SKIPPED_POSITIONS] = 0
    weights = torch.where(later.sum(1, keepdim=True) > 0, later, weights).unsqueeze(-1)
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


def centre(decoder, reference_ids):
    """The centre scores are measured from: the profile of plain text of no particular domain
    (``watch.reference_ids``), in windows as short as prompts often are."""
    return torch.tensor(profile(decoder, reference_ids, window=64))


def scores(prompt_hidden, profiles, centre):
    """Cosine of the prompt's direction from the centre with each profile's: (N,)."""
    directions = F.normalize(profiles.float() - centre, dim=-1)
    return directions @ F.normalize(prompt_hidden.float() - centre, dim=-1)
