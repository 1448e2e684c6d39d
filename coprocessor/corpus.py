"""Corpora: plain text or JSONL ({"text": ...} per line), and the demo corpus."""

import json
from pathlib import Path

import torch

from . import bounded_json


def read_texts(path):
    """Documents of a .jsonl file (one {"text": ...} per line) or a plain text file (one)."""
    path = Path(path)
    return parse_texts(path.read_text(encoding="utf-8"), jsonl=path.suffix == ".jsonl", source=path)


def parse_texts(data, *, jsonl, source="line"):
    """Documents of a text: itself, or one per JSONL line. ValueError names the bad line."""
    if not jsonl:
        return [data]
    texts = []
    where = f"{source}:" if source != "line" else "line "
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = bounded_json.loads(line)  # a user's upload: a deep line is refused
        except bounded_json.Refused as exc:
            raise ValueError(f"{where}{number}: JSON {exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}{number}: not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{where}{number}: expected an object with a "text" string')
        texts.append(record["text"])
    return texts


def tokenize(tokenizer, texts, separator="\n\n"):
    """One 1-D LongTensor of token ids for a list of documents, joined by ``separator``."""
    ids = tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def pydoc_topics():
    """The Python documentation that CPython ships, as (topic, text) pairs, sorted."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def demo_split(heldout_every=10):
    """Train and held-out texts of the demo corpus, split by topic (every 10th held out)."""
    topics = pydoc_topics()
    train = [text for i, (_, text) in enumerate(topics) if i % heldout_every]
    heldout = [text for i, (_, text) in enumerate(topics) if not i % heldout_every]
    return train, heldout


def split_texts(texts, heldout_fraction=0.1):
    """Train and held-out parts of any corpus: the last fraction of its characters held out."""
    joined = "\n\n".join(texts)
    cut = int(len(joined) * (1 - heldout_fraction))
    return [joined[:cut]], [joined[cut:]]
