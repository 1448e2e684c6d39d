"""Loading base models from a folder, a Hub cache (offline) and GGUF; fingerprints."""

import os

import pytest
import torch

from coprocessor import base_models
from tests.factories import FAMILIES, frozen, tiny_llama, word_tokenizer


@pytest.fixture(params=list(FAMILIES))
def saved_family(request, tmp_path):
    model = frozen(FAMILIES[request.param])
    folder = tmp_path / request.param
    base_models.convert(model, word_tokenizer(), folder)
    return model, folder


def test_it_loads_a_local_folder_with_identical_weights(saved_family):
    model, folder = saved_family
    loaded, tokenizer = base_models.load(folder)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tokenizer.convert_tokens_to_ids("w3") == 3
    assert not any(p.requires_grad for p in loaded.parameters())
    assert base_models.fingerprint(loaded) == base_models.fingerprint(model)


def test_it_resolves_a_hub_id_from_a_prepared_cache_without_network(tmp_path, monkeypatch):
    """The layout huggingface-hub writes: models--org--name/{refs/main, snapshots/<rev>/}."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = frozen(FAMILIES["qwen2"])
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--latentry--tiny-qwen2"
    base_models.convert(model, word_tokenizer(), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded, _ = base_models.load("latentry/tiny-qwen2", cache_dir=tmp_path / "hub")
    assert base_models.fingerprint(loaded) == base_models.fingerprint(model)
    with pytest.raises(Exception, match="(?i)cannot find|offline|not found|local"):
        base_models.load("latentry/not-there", cache_dir=tmp_path / "hub")


def test_fingerprints_change_with_any_weight():
    model = frozen(FAMILIES["llama"])
    before = base_models.fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert base_models.fingerprint(model) != before


def test_describe_gives_what_validation_needs():
    spec = base_models.describe(frozen(FAMILIES["gpt2"]))
    assert spec.hidden_size == 32 and spec.num_layers == 2
    assert spec.param_shapes["transformer.h.0.attn.c_attn.weight"] == [32, 96]


@pytest.mark.django_db
@pytest.mark.parametrize("slug", ["../../etc", "a/b", "héllo", ""])
def test_import_base_model_takes_only_a_slug(slug, settings, tmp_path):
    from django.core.management import CommandError, call_command

    from registry.models import BaseModel

    settings.BASE_MODELS_DIR = tmp_path
    with pytest.raises(CommandError, match="is not a slug"):
        call_command("import_base_model", "some-folder", "--slug", slug)
    assert not BaseModel.objects.exists() and not any(tmp_path.iterdir())


def test_the_service_refuses_the_example_secret_key_from_deploy():
    import subprocess
    import sys
    from pathlib import Path

    example = Path("deploy/systemd/env.example").read_text()
    key = next(line for line in example.splitlines() if line.startswith("SECRET_KEY="))
    env = {**os.environ, "SECRET_KEY": key.partition("=")[2], "DEBUG": "false"}
    run = subprocess.run(
        [sys.executable, "manage.py", "check"], env=env, capture_output=True, text=True
    )
    assert run.returncode != 0 and "SECRET_KEY is the example from deploy/" in run.stderr
    env["SECRET_KEY"] = "a-secret-of-our-own-" + "x" * 40
    assert subprocess.run([sys.executable, "manage.py", "check"], env=env).returncode == 0


def test_debug_is_off_unless_set():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "SECRET_KEY")}
    show = "from django.conf import settings; print(settings.DEBUG)"
    run = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", show], env=env, capture_output=True, text=True
    )
    assert run.returncode != 0 and "SECRET_KEY must be set when DEBUG is off" in run.stderr
    env["SECRET_KEY"] = "a-secret-of-our-own-" + "x" * 40
    run = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", show], env=env, capture_output=True, text=True
    )
    assert run.stdout.strip().splitlines()[-1] == "False"


def test_the_default_s_converted_copy_appears_whole_and_the_first_one_stays(tmp_path, monkeypatch):
    """Test workers, a server and its job worker may convert at once: a reader that sees
    config.json must find the weights, and a second conversion leaves the first in place."""
    made = frozen(tiny_llama), word_tokenizer()
    monkeypatch.setattr(base_models, "load", lambda source, **kwargs: made)
    folder = tmp_path / "models" / "default"
    base_models.load_default(folder)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    first = (folder / "model.safetensors").stat().st_mtime_ns
    (folder / "config.json").rename(folder / "config.moved")  # as if still converting
    base_models.load_default(folder)  # converts again, and finds the folder taken
    assert (folder / "model.safetensors").stat().st_mtime_ns == first
    assert [p.name for p in folder.parent.iterdir()] == ["default"]  # no scratch left behind
