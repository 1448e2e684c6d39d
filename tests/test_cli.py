"""The coprocessor command line on a tiny model: train, evaluate, generate, export, import."""

import json

import pytest

from coprocessor import artifact, base_models, hub
from coprocessor.__main__ import main
from tests.factories import frozen, phrase_corpus, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base_models.convert(frozen(tiny_llama), word_tokenizer(), root / "base")
    words = " ".join(f"w{max(2, t)}" for t in phrase_corpus(length=1500).tolist())
    (root / "corpus.txt").write_text(words)
    lines = [json.dumps({"text": words[i : i + 600]}) for i in range(0, len(words), 600)]
    (root / "corpus.jsonl").write_text("\n".join(lines))
    return root


def run(capsys, *argv):
    main([*argv, "--threads", "1"])
    return capsys.readouterr().out


def test_train_evaluate_generate_export_import(workspace, capsys):
    base, out = str(workspace / "base"), str(workspace / "expert.safetensors")
    printed = run(
        capsys,
        "train",
        "--base",
        base,
        "--data",
        str(workspace / "corpus.jsonl"),
        "--out",
        out,
        "--steps",
        "3",
        "--window",
        "32",
        "--ahead-tokens",
        "4",
        "--positions-per-window",
        "2",
        "--n-latents",
        "2",
        "--lora-rank",
        "2",
    )
    assert "stopped at step 3: all its steps ran" in printed
    header = artifact.read_header_from_path(out)
    assert header.kind == "lora" and header.n_latents == 2
    assert header.config["training"]["steps_done"] == 3

    report = json.loads(
        run(
            capsys,
            "evaluate",
            "--base",
            base,
            "--expert",
            out,
            "--data",
            str(workspace / "corpus.txt"),
            "--window",
            "32",
            "--ahead",
            "4",
            "--json",
        )
    )
    assert len(report["augmented"]["ppl_by_position"]) == 4

    text = run(
        capsys,
        "generate",
        "--base",
        base,
        "--expert",
        out,
        "--prompt",
        "w3 w4 w5",
        "--max-new-tokens",
        "3",
    )
    assert text.strip()

    folder = workspace / "exported"
    run(
        capsys,
        "export",
        "--expert",
        out,
        "--out",
        str(folder),
        "--name",
        "phrases",
        "--summary",
        "Learns phrases.",
    )
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert_peft_loads_the_adapter(folder, workspace / "base", out)
    path, info, body = hub.import_folder(folder)
    assert info["kind"] == "lora" and "Learns phrases." in body
    assert path.read_bytes() == (workspace / "expert.safetensors").read_bytes()


def assert_peft_loads_the_adapter(folder, base_folder, expert_path):
    """PeftModel.from_pretrained reads the exported adapter; it equals our hooked LoRA."""
    import torch
    from peft import PeftModel

    from coprocessor.expert import Coprocessor

    base, _ = base_models.load(base_folder)
    expert = Coprocessor.load(base, expert_path)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with expert.active():
        ours = base(ids).logits
    peft_model = PeftModel.from_pretrained(base_models.load(base_folder)[0], folder)
    torch.testing.assert_close(peft_model(ids).logits, ours, atol=1e-5, rtol=1e-5)


def test_import_refuses_a_tampered_folder(workspace, tmp_path):
    out = tmp_path / "expert.safetensors"
    main(
        [
            "train",
            "--base",
            str(workspace / "base"),
            "--data",
            str(workspace / "corpus.txt"),
            "--out",
            str(out),
            "--steps",
            "1",
            "--window",
            "32",
            "--ahead-tokens",
            "4",
            "--positions-per-window",
            "4",
            "--n-latents",
            "2",
            "--lora-rank",
            "2",
            "--threads",
            "1",
        ]
    )
    folder = hub.export_folder(out, tmp_path / "f", name="x", base_model_source="b")
    data = bytearray((folder / "expert.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "expert.safetensors").write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="sha256"):
        hub.import_folder(folder)


def test_bad_jsonl_is_named_with_its_line(workspace, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        main(
            [
                "train",
                "--base",
                str(workspace / "base"),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "x.safetensors"),
                "--threads",
                "1",
            ]
        )
