"""Hub-style folders: an expert exported for the Hugging Face Hub and PEFT, and read back.

A folder holds the expert file, PEFT adapter files (the LoRA's adapter_config.json, a static
prefix as a CARTRIDGE adapter), latentry.json and a README.md model card whose front matter
carries the Hub's fields and ``model-index``. It is a publishing format built on the expert
file (``artifact``), kept apart so that the file format needs none of huggingface_hub, peft
or yaml and never changes when the Hub's conventions do. A folder is read as untrusted input:
no links, sizes checked before reading (``open_in_folder``).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .artifact import (
    FORMAT_TAG,
    LORA_NAME,
    ArtifactError,
    load_expert,
    load_json,
    read_header,
    read_header_from_path,
)

EXPERT_FILENAME = "expert.safetensors"
CARTRIDGE_FOLDER = "cartridge"
CARD_FILENAME = "README.md"
INFO_FILENAME = "latentry.json"
# latentry.json (an expert's config and a few names) and README.md, read from a folder.
MAX_FOLDER_TEXT_BYTES = 1024 * 1024
# The card's own tags; the expert's tags and its domain follow them.
CARD_TAGS = ("latentry", "coprocessor", "kv-cache-augmentation")
FILE_MODE, FOLDER_MODE = 0o644, 0o755  # an export is for others to read
HASH_CHUNK = 4 * 1024 * 1024  # bytes hashed at a time: an expert file is never held in memory


def export_folder(expert_path, folder, *, name, base_model_source, **card_fields):
    """Write a Hub-style folder: the expert file, PEFT adapter files, latentry.json, README.md.

    The folder's own PEFT adapter is the expert's LoRA, or its static prefix as a cartridge
    when that is the whole expert (``AutoPeftModelForCausalLM.from_pretrained(folder)`` with
    ``base_model_source`` a Hub id); a prefix beside LoRA goes to ``cartridge/``. Latentry
    imports the folder back from ``expert.safetensors``. Every file is 0644. The card
    (``model_card``, to which ``card_fields`` go) carries the Hub's front matter, the title,
    summary, domain and the platform's measured ``figures`` under ``latentry:``, and
    ``evaluations`` as the Hub's ``model-index``.
    """
    import hashlib
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    header = read_header_from_path(expert_path)
    shutil.copyfile(expert_path, folder / EXPERT_FILENAME)
    tensors, metadata = load_expert(expert_path)
    if header.kind == "lora":
        _write_peft_adapter(folder, tensors, metadata, base_model_source)
    if header.prefix_positions:  # the folder's own adapter when it is the whole expert
        cartridge = folder if header.kind == "prefix" else folder / CARTRIDGE_FOLDER
        _write_peft_cartridge(cartridge, tensors, header, base_model_source)
    info = {
        "format": FORMAT_TAG,
        "name": name,
        "kind": header.kind,
        "n_latents": header.n_latents,
        "prefix_positions": header.prefix_positions,
        "base_model": base_model_source,
        "base_model_fingerprint": metadata["base_model_fingerprint"],
        "sha256": hashlib.sha256((folder / EXPERT_FILENAME).read_bytes()).hexdigest(),
        "config": header.config,
    }
    (folder / INFO_FILENAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    model_card(name, base_model_source, **card_fields).save(folder / CARD_FILENAME)
    for path in folder.rglob("*"):  # one mode for all, whatever wrote each (tempfiles: 0600)
        path.chmod(FOLDER_MODE if path.is_dir() else FILE_MODE)
    return folder


def _write_peft_adapter(folder, tensors, metadata, base_model_source):
    from safetensors.torch import save_file

    lora = {name: t for name, t in tensors.items() if LORA_NAME.match(name)}
    targets = load_json(metadata["lora_target_modules"], "metadata lora_target_modules")
    save_file(lora, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_source,
        "r": int(metadata["lora_rank"]),
        "lora_alpha": float(metadata["lora_alpha"]),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": targets,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


def _write_peft_cartridge(folder, tensors, header, base_model_source):
    """The static prefix as a PEFT CARTRIDGE adapter (its ``prompt_embeddings`` layout).

    PEFT has no gate: it attends to every position fully, which equals the expert where the
    gates are open (0) and differs where training left a position closed.
    """
    from peft import CartridgeConfig
    from peft.tuners.cartridge.utils import prompt_embeddings_from_past_key_values
    from safetensors.torch import save_file

    keys, values = tensors["prefix.keys"], tensors["prefix.values"]
    layers, kv_heads, positions, head_dim = keys.shape
    past = [(k[None], v[None]) for k, v in zip(keys, values, strict=True)]
    config = CartridgeConfig(
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_source,
        num_virtual_tokens=positions,
        num_frozen_tokens=_frozen_positions(header),
        num_layers=layers,
        token_dim=kv_heads * head_dim,
        num_attention_heads=kv_heads,
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    embeddings = prompt_embeddings_from_past_key_values(past, num_virtual_tokens=positions)
    save_file(
        {"prompt_embeddings": embeddings.contiguous()}, str(folder / "adapter_model.safetensors")
    )


def _frozen_positions(header):
    config = header.config if isinstance(header.config, dict) else {}
    expert = config.get("coprocessor")
    frozen = expert.get("prefix_frozen", 1) if isinstance(expert, dict) else 1
    return min(int(frozen), header.prefix_positions) if isinstance(frozen, int) else 1


def model_card(
    name,
    base_model_source,
    *,
    summary="",
    card="",
    license="apache-2.0",
    domain="",
    title="",
    tags=(),
    datasets=(),
    figures=None,
    evaluations=(),
):
    """The folder's README.md as a ``huggingface_hub.ModelCard``: the Hub's fields in the front
    matter (``base_model`` with ``base_model_relation: adapter``, ``license``, ``tags``,
    ``datasets``, ``library_name``), ours under ``latentry:``, ``evaluations`` (dicts with
    ``dataset``, ``split``, ``ppl_expert``, ``reduction_pct``, optionally ``dataset_name``) as
    ``model-index`` results, and ``card`` (Markdown) as the body, or a heading and the summary
    when it is empty."""
    from huggingface_hub import ModelCard, ModelCardData

    latentry = {"name": name, "title": title, "summary": summary, "domain": domain}
    results = [result for e in evaluations for result in _eval_results(e)]
    data = ModelCardData(
        base_model=base_model_source,
        base_model_relation="adapter",
        license=license,
        library_name="latentry",
        tags=[*CARD_TAGS, *tags, *([domain] if domain else [])],
        datasets=list(datasets) or None,
        model_name=name if results else None,
        eval_results=results or None,
        latentry={**latentry, **(figures or {})},
    )
    body = card.strip() or f"# {title or name}\n\n{summary}".strip()
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def _eval_results(evaluation):
    """One held-out evaluation as the Hub's results: the perplexity with the expert, and how
    much lower it is than the base model's (%)."""
    from huggingface_hub import EvalResult

    where = dict(
        task_type="text-generation",
        dataset_type=evaluation["dataset"],
        dataset_name=evaluation.get("dataset_name") or evaluation["dataset"],
        dataset_split=evaluation.get("split") or None,
    )
    return [
        EvalResult(
            **where,
            metric_type="perplexity",
            metric_name="Perplexity with the expert",
            metric_value=round(evaluation["ppl_expert"], 4),
        ),
        EvalResult(
            **where,
            metric_type="perplexity_reduction",
            metric_name="Perplexity reduction over the base model (%)",
            metric_value=round(evaluation["reduction_pct"], 3),
        ),
    ]


@dataclass(frozen=True)
class Card:
    """What a folder's README.md says, as Latentry reads it back."""

    title: str
    summary: str
    license: str
    tags: list[str]
    domain: str
    body: str
    data: dict  # the whole front matter


def read_card(folder):
    """The folder's card (``Card``), parsed with ``huggingface_hub.ModelCard``; an empty one
    without a README.md. ``latentry:`` gives the title, summary and domain where present (our
    exports); otherwise the body's first heading is the title and its first paragraph the
    summary. ArtifactError for front matter that is not YAML or not a mapping, and for a
    README.md that ``open_in_folder`` refuses."""
    import yaml
    from huggingface_hub import ModelCard

    if not os.path.lexists(Path(folder) / CARD_FILENAME):  # a dangling link is refused below
        return Card(title="", summary="", license="", tags=[], domain="", body="", data={})
    try:
        card = ModelCard(_read_text(folder, CARD_FILENAME), ignore_metadata_errors=True)
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise ArtifactError(f"{CARD_FILENAME} is not a readable model card: {exc}") from None
    except RecursionError:  # PyYAML recurses once per level of the front matter
        raise ArtifactError(f"{CARD_FILENAME}'s front matter is nested too deeply") from None
    data = card.data.to_dict()
    ours = data.get("latentry") if isinstance(data.get("latentry"), dict) else {}
    body = card.text.strip()
    heading, paragraph = _heading_and_paragraph(body)
    tags = data.get("tags") or []
    return Card(
        title=_text(ours.get("title")) or heading,
        summary=_text(ours.get("summary")) or paragraph,
        license=_text(data.get("license")),
        tags=[str(t) for t in (tags if isinstance(tags, list) else [tags])],
        domain=_text(ours.get("domain")),
        body=body,
        data=data,
    )


def _text(value):
    return value.strip() if isinstance(value, str) else ""


def _heading_and_paragraph(markdown):
    """The first ``#`` heading's text and the first paragraph that is not a heading."""
    heading, paragraph = "", ""
    for block in markdown.split("\n\n"):
        block = block.strip()
        if block.startswith("#"):
            heading = heading or block.splitlines()[0].lstrip("#").strip()
        elif block and not paragraph:
            paragraph = " ".join(line.strip() for line in block.splitlines())
        if heading and paragraph:
            break
    return heading, paragraph


def import_folder(folder, max_bytes=None):
    """Read a Hub-style folder back, as untrusted input: (path of the expert file,
    latentry.json, README body).

    Every file is opened with ``open_in_folder`` (its own regular file, no link, its size
    checked before reading: the expert file against ``max_bytes``); latentry.json must be a
    JSON object within the bounds of an expert file's JSON; the expert file is hashed in
    chunks and checked against the sha256 that latentry.json records, then its header read.
    ``read_card`` reads the rest of the card.
    """
    import hashlib

    info = load_json(_read_text(folder, INFO_FILENAME), INFO_FILENAME)
    if not isinstance(info, dict):
        raise ArtifactError(f"{INFO_FILENAME} must be a JSON object")
    with open_in_folder(folder, EXPERT_FILENAME, max_bytes) as f:
        digest = hashlib.sha256()
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != info.get("sha256"):
            raise ArtifactError(f"{EXPERT_FILENAME} does not match the sha256 in {INFO_FILENAME}")
        read_header(f, f.tell(), max_header_bytes=None)
    return Path(folder) / EXPERT_FILENAME, info, read_card(folder).body


def open_in_folder(folder, name, max_bytes=None):
    """``folder/name`` opened for reading in binary, as untrusted input: ArtifactError if it
    is missing, a symbolic link (it could make any file on this machine part of the import),
    not a regular file (a FIFO would block), or over ``max_bytes`` (None: no bound), before
    a byte of it is read."""
    import errno
    import stat

    path = Path(folder) / name
    if path.is_symlink():
        raise ArtifactError(_LINK_REFUSED.format(name=name))
    try:  # O_NOFOLLOW: a link put in its place since the check is refused too
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{folder} has no {name}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactError(_LINK_REFUSED.format(name=name)) from None
        raise ArtifactError(f"{name} cannot be read: {exc.strerror}") from None
    f = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        f.close()
        raise ArtifactError(f"{name} is not a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        f.close()
        raise ArtifactError(f"{name} is {info.st_size} bytes, over the limit of {max_bytes}")
    return f


_LINK_REFUSED = (
    "{name} is a symbolic link; an imported folder must hold its own files (copy it with "
    "links followed, e.g. `cp -rL`, or download it with huggingface_hub's local_dir)"
)


def _read_text(folder, name):
    """A small text file of the folder (latentry.json, README.md), within
    MAX_FOLDER_TEXT_BYTES."""
    with open_in_folder(folder, name, MAX_FOLDER_TEXT_BYTES) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{name} is not UTF-8 text: {exc}") from None
