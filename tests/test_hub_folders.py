"""Hub-style folders through `manage.py export_expert` and `import_expert`: the model card says
what the Hub reads (base model, relation, license, tags, datasets, the measured figures), a
folder comes back as the same bytes in another registry, and a folder that is tampered with,
for another base model, under a taken name, or holding links or hostile files creates nothing
(another user's copy: tests/test_copies.py)."""

import hashlib
import io
import json
import os
import shutil
import stat

import pytest
import torch
from django.core.management import CommandError, call_command
from django.utils import timezone
from huggingface_hub import ModelCard

from coprocessor import hub
from coprocessor.expert import Coprocessor, CoprocessorConfig, augmented_forward
from coprocessor.generate import Request, generate
from coprocessor.objective import position_batch
from registry.models import Expert, ExpertVersion
from tests.factories import SMALL_JOB, frozen, make_dataset, randomize, stored_keys, tiny_llama
from training.models import Benchmark, BenchmarkResult, TrainingJob

pytestmark = pytest.mark.django_db


def publish_file(expert, data, **fields):
    return ExpertVersion.publish(
        expert, io.BytesIO(data), sha256=hashlib.sha256(data).hexdigest(), size=len(data), **fields
    )


def export(target, folder):
    call_command("export_expert", target, str(folder), stdout=io.StringIO())
    return folder


def import_(folder, *args):
    out = io.StringIO()
    call_command("import_expert", str(folder), *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def pydoc(make_expert):
    return make_expert(
        "pydoc",
        title="Python docs",
        summary="The standard library, in the cache",
        model_card="# Python docs\n\nKnows the **standard library**.",
        license="mit",
        tags=["stdlib", "docs"],
    )


@pytest.fixture
def measured(pydoc, expert_file):
    """pydoc's version 1, measured on its domain's benchmarks and on the owner's data."""
    version = publish_file(pydoc, expert_file())
    ExpertVersion.objects.filter(pk=version.pk).update(
        benchmark_gain=6.5,
        off_domain_change=-0.25,
        latency_ratio=1.12,
        benchmarked_at=timezone.now(),
        metrics={
            "reduction_pct": 4.0,
            "evaluations": [
                {
                    "dataset": "alice/words",
                    "split": "heldout",
                    "ppl_base": 9.5,
                    "ppl_expert": 9.12,
                    "reduction_pct": 4.0,
                    "measured_at": "2026-12-01T10:00:00+00:00",
                }
            ],
        },
    )
    pydoc.refresh_measured_gain()
    version.refresh_from_db()
    return version


def test_the_card_carries_what_the_hub_reads(measured, base_model, tmp_path):
    folder = export("alice/pydoc", tmp_path / "out")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == base_model.export_name
    assert card.data.base_model_relation == "adapter"
    assert card.data.license == "mit" and card.data.library_name == "latentry"
    assert card.data.tags == [*hub.CARD_TAGS, "stdlib", "docs", "python"]
    assert card.data.datasets is None  # an upload: no training data to name
    figures = card.data.latentry
    assert figures["expert"] == "alice/pydoc" and figures["version"] == 1
    assert figures["measured_gain"] == 6.5 and figures["gain_source"] == Expert.BENCHMARK
    assert figures["benchmark_gain"] == 6.5 and figures["off_domain_change"] == -0.25
    assert figures["latency_ratio"] == 1.12
    assert figures["measured_at"] == measured.benchmarked_at.isoformat()
    [perplexity, reduction] = card.data.eval_results
    assert (perplexity.dataset_type, perplexity.dataset_split) == ("alice/words", "heldout")
    assert perplexity.metric_type == "perplexity" and perplexity.metric_value == 9.12
    assert reduction.metric_value == 4.0
    assert "Knows the **standard library**." in card.text
    info = json.loads((folder / "latentry.json").read_text())
    assert info["sha256"] == measured.sha256 and info["name"] == "pydoc"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_the_card_names_the_base_model_by_its_hub_id_and_holds_the_benchmark_figures(
    measured, base_model, alice, tmp_path
):
    base_model.hub_id = "latentry-tests/tiny-llama"
    base_model.save()
    benchmark = Benchmark.objects.create(
        domain=measured.expert.domain, dataset=make_dataset(alice, "hidden-text")
    )
    BenchmarkResult.objects.create(
        version=measured,
        benchmark=benchmark,
        pairs=64,
        ppl_base=10.0,
        ppl_expert=9.35,
        reduction_pct=6.5,
        latency_ratio=1.12,
    )
    folder = export("alice/pydoc", tmp_path / "out")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "latentry-tests/tiny-llama"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "latentry-tests/tiny-llama"
    on_benchmark = [r for r in card.data.eval_results if r.dataset_split == "benchmark"]
    assert [(r.dataset_type, r.metric_value) for r in on_benchmark] == [
        ("latentry-benchmark/python", 9.35),
        ("latentry-benchmark/python", 6.5),
    ]
    assert on_benchmark[0].dataset_name == "Latentry Python benchmark"
    assert "hidden-text" not in (folder / "README.md").read_text()  # a benchmark stays hidden
    modes = {stat.S_IMODE(path.stat().st_mode) for path in folder.rglob("*") if path.is_file()}
    assert modes == {0o644}


def test_without_a_hub_id_the_card_names_the_slug_never_a_local_path(measured, tmp_path):
    card = ModelCard.load(export("alice/pydoc", tmp_path / "out") / "README.md")
    assert card.data.base_model == "tiny-llama"


def hub_cache(tmp_path, hub_id, weights_folder):
    """A Hugging Face cache holding ``weights_folder`` as ``hub_id``, as a download leaves it."""
    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(weights_folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return cache


def test_a_prefix_export_loads_with_auto_peft_offline_and_answers_as_the_router(
    make_expert, base_model, tiny_base_dir, tmp_path
):
    """PEFT's cartridge has no gate: with the gates open it computes what the router does."""
    from peft import AutoPeftModelForCausalLM

    base_model.hub_id = "latentry-tests/tiny-llama"
    base_model.save()
    decoder = frozen(tiny_llama)
    config = CoprocessorConfig(n_latents=0, prefix_positions=4, seed=3)
    expert = randomize(Coprocessor(decoder, config), seed=3)
    path = tmp_path / "prefix.safetensors"
    expert.save(path, base_model.fingerprint, base_model.slug)
    publish_file(make_expert("prefixed"), path.read_bytes())
    folder = export("alice/prefixed", tmp_path / "out")
    cache = hub_cache(tmp_path, base_model.hub_id, tiny_base_dir)
    with pytest.warns(FutureWarning, match="past_key_values"):  # PEFT's call, not ours
        peft_model = AutoPeftModelForCausalLM.from_pretrained(
            folder, cache_dir=cache, local_files_only=True
        )
        prompt = [3, 8, 1, 9, 14]
        their_logits = peft_model(input_ids=torch.tensor([prompt])).logits[0, -1]
        theirs = peft_model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False
        )[0, len(prompt) :]
    served = Coprocessor.load(decoder, folder / hub.EXPERT_FILENAME)
    # The router's passes: the prefix in front of the prompt's row, then greedy decoding.
    past, bias, tokens, _, starts = position_batch(
        decoder, torch.tensor([[*prompt, 0]]), torch.tensor([[len(prompt)]]), 1, served.prefix
    )
    our_logits = augmented_forward(
        decoder, served, past=past, past_bias=bias, tokens=tokens, positions=starts
    )[0, 0]
    torch.testing.assert_close(their_logits, our_logits, atol=1e-5, rtol=1e-5)
    ours = generate(decoder, [Request(prompt, served, max_new_tokens=4)], eos_token_id=None)[0]
    assert theirs.tolist() == ours.token_ids


def test_a_trained_version_names_its_datasets(alice, pydoc, expert_file, tmp_path):
    words = make_dataset(alice, "words")
    more = make_dataset(alice, "more-words")
    job = TrainingJob.start(alice, pydoc, [words, more], SMALL_JOB)
    publish_file(pydoc, expert_file(), training_job=job)
    card = ModelCard.load(export("alice/pydoc", tmp_path / "out") / "README.md")
    assert card.data.datasets == ["alice/more-words", "alice/words"]
    assert card.data.latentry["measured_gain"] is None  # not measured yet
    assert card.data.latentry["gain_source"] is None


def test_a_folder_comes_back_as_the_same_version_in_another_registry(measured, bob, tmp_path):
    folder = export("alice/pydoc", tmp_path / "out")
    original = measured.expert
    Expert.objects.filter(pk=original.pk).delete()  # another registry: the bytes are not here
    output = import_(folder, "--owner", "bob", "--visibility", "public")
    assert "imported bob/pydoc version 1" in output
    copy = Expert.objects.get(owner=bob, name="pydoc")
    for field in ("title", "summary", "model_card", "license", "tags", "domain", "base_model"):
        assert getattr(copy, field) == getattr(original, field), field
    assert copy.visibility == Expert.PUBLIC and copy.measured_gain is None  # not measured here
    version = copy.versions.get()
    assert version.sha256 == measured.sha256 and version.number == 1 and version.kind == "lora"
    assert version.read_verified() == (folder / "expert.safetensors").read_bytes()
    assert version.claimed_metrics == {
        "measured_gain": 6.5,
        "gain_source": Expert.BENCHMARK,
        "benchmark_gain": 6.5,
        "off_domain_change": -0.25,
        "latency_ratio": 1.12,
        "measured_on": "alice/pydoc@1",
    }
    assert "alice/pydoc version 1" in version.changelog


def test_an_import_is_private_unless_asked_and_may_be_renamed(measured, bob, domain, tmp_path):
    folder = export("alice/pydoc", tmp_path / "out")
    import_(folder, "--owner", "alice", "--name", "pydoc-copy", "--domain", "python")
    copy = Expert.objects.get(owner__username="alice", name="pydoc-copy")
    assert copy.visibility == Expert.PRIVATE and copy.versions.get().sha256 == measured.sha256


def test_a_cli_export_imports_too(alice, base_model, domain, expert_file, tmp_path):
    path = tmp_path / "expert.safetensors"
    path.write_bytes(expert_file())
    folder = hub.export_folder(
        path, tmp_path / "out", name="phrases", base_model_source="x", summary="Learns phrases."
    )
    import_(folder, "--owner", "alice", "--domain", "python")
    expert = Expert.objects.get(name="phrases")
    assert expert.title == "phrases" and expert.summary == "Learns phrases." and expert.tags == []


def test_refs_pick_the_version(pydoc, alice, expert_file, tmp_path):
    first = publish_file(pydoc, expert_file(seed=1))
    second = publish_file(pydoc, expert_file(seed=2))
    pydoc.move_alias(alice, "stable", 1)

    def exported(ref, name):
        folder = export(f"alice/pydoc{ref}", tmp_path / name)
        return json.loads((folder / "latentry.json").read_text())["sha256"]

    assert exported("", "plain") == second.sha256
    assert exported("@latest", "latest") == second.sha256
    assert exported("@1", "one") == first.sha256
    assert exported("@stable", "stable") == first.sha256


def test_any_expert_exports_but_never_a_rejected_version(make_expert, bob, expert_file, tmp_path):
    secret = make_expert("secret", owner=bob, visibility=Expert.PRIVATE)
    publish_file(secret, expert_file(seed=1))
    export("bob/secret", tmp_path / "secret")  # the operator's command: visibility aside
    publish_file(secret, expert_file(seed=2)).reject("stored bytes do not match")
    with pytest.raises(CommandError, match="version 2 was rejected"):
        export("bob/secret@2", tmp_path / "rejected")
    assert json.loads((tmp_path / "secret" / "latentry.json").read_text())["name"] == "secret"
    # The newest ready version is still version 1.
    export("bob/secret@latest", tmp_path / "latest")


def test_export_names_what_is_missing(pydoc, measured, tmp_path):
    with pytest.raises(CommandError, match="no expert named 'alice/nothing'"):
        export("alice/nothing", tmp_path / "a")
    with pytest.raises(CommandError, match="no version '7'"):
        export("alice/pydoc@7", tmp_path / "b")
    with pytest.raises(CommandError, match="no version 'beta'"):
        export("alice/pydoc@beta", tmp_path / "c")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(CommandError, match="not an empty folder"):
        export("alice/pydoc", tmp_path / "full")


def test_export_rejects_a_version_whose_stored_bytes_changed(measured, tmp_path, settings):
    location = settings.STORAGES["artifacts"]["OPTIONS"]["location"]
    stored = location / measured.artifact_key
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x01")
    with pytest.raises(CommandError, match="do not match its sha256"):
        export("alice/pydoc", tmp_path / "out")
    measured.refresh_from_db()
    assert measured.status == ExpertVersion.REJECTED


def assert_nothing_imported(experts_before, keys_before):
    assert Expert.objects.count() == experts_before
    assert stored_keys() == keys_before


def test_a_tampered_folder_creates_nothing(measured, bob, tmp_path):
    folder = export("alice/pydoc", tmp_path / "out")
    data = bytearray((folder / "expert.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "expert.safetensors").write_bytes(bytes(data))
    before = Expert.objects.count(), stored_keys()
    with pytest.raises(CommandError, match="does not match the sha256"):
        import_(folder, "--owner", "bob")
    assert_nothing_imported(*before)


def test_a_file_the_upload_checks_refuse_creates_nothing(measured, bob, expert_file, tmp_path):
    """The folder is consistent (its sha256 matches) but the file holds NaNs: publish refuses
    it after the expert row was made, and the transaction takes the row back."""
    folder = export("alice/pydoc", tmp_path / "out")
    broken = expert_file(tensors={"soft_tokens": torch.full((4, 32), float("nan"))})
    (folder / "expert.safetensors").write_bytes(broken)
    info = json.loads((folder / "latentry.json").read_text())
    info["sha256"] = hashlib.sha256(broken).hexdigest()
    (folder / "latentry.json").write_text(json.dumps(info))
    before = Expert.objects.count(), stored_keys()
    with pytest.raises(CommandError, match="NaN or infinite.*nothing was imported"):
        import_(folder, "--owner", "bob")
    assert_nothing_imported(*before)


def test_a_folder_for_a_base_model_not_imported_here_is_refused(measured, bob, tmp_path):
    folder = export("alice/pydoc", tmp_path / "out")
    info = json.loads((folder / "latentry.json").read_text())
    info["base_model_fingerprint"] = "f" * 64
    (folder / "latentry.json").write_text(json.dumps(info))
    before = Expert.objects.count(), stored_keys()
    with pytest.raises(CommandError, match="is not imported here"):
        import_(folder, "--owner", "bob")
    assert_nothing_imported(*before)


def test_a_taken_name_an_unknown_owner_or_domain_is_refused(measured, bob, tmp_path):
    folder = export("alice/pydoc", tmp_path / "out")
    before = Expert.objects.count(), stored_keys()
    with pytest.raises(CommandError, match="already have an expert named 'pydoc'"):
        import_(folder, "--owner", "alice")
    with pytest.raises(CommandError, match="no user named 'carol'"):
        import_(folder, "--owner", "carol")
    with pytest.raises(CommandError, match="no domain 'nope'"):
        import_(folder, "--owner", "bob", "--domain", "nope")
    with pytest.raises(CommandError, match="name"):
        import_(folder, "--owner", "bob", "--name", "Not A Slug")
    assert_nothing_imported(*before)


# --- a folder is untrusted input ---------------------------------------------------------------


@pytest.fixture
def folder(measured, tmp_path):
    return export("alice/pydoc", tmp_path / "out")


def refused(folder, message):
    """import_expert refuses ``folder`` with ``message`` and leaves nothing behind."""
    before = Expert.objects.count(), stored_keys()
    with pytest.raises(CommandError, match=message):
        import_(folder, "--owner", "alice", "--name", "imported")
    assert_nothing_imported(*before)


@pytest.mark.parametrize("name", ["README.md", "latentry.json", "expert.safetensors"])
def test_it_refuses_a_file_that_is_a_link_out_of_the_folder(folder, tmp_path, name):
    secret = tmp_path / "secret.txt"
    secret.write_bytes((folder / name).read_bytes())  # the same bytes: only the link is wrong
    (folder / name).unlink()
    (folder / name).symlink_to(secret)
    refused(folder, f"{name} is a symbolic link")


def test_it_never_makes_a_secret_file_the_model_card(folder, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("# Secret\n\nthe database password is hunter2\n")
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(secret)
    refused(folder, "README.md is a symbolic link")
    assert not Expert.objects.filter(model_card__contains="hunter2").exists()


def test_it_refuses_a_file_that_is_not_a_regular_file(folder):
    (folder / "README.md").unlink()
    os.mkfifo(folder / "README.md")  # reading it would wait for a writer forever
    refused(folder, "README.md is not a regular file")


def test_it_checks_the_size_of_the_expert_file_before_reading_it(folder, settings):
    settings.LATENTRY_MAX_ARTIFACT_BYTES = 100
    with (folder / "expert.safetensors").open("ab") as f:
        f.write(b"tampered")  # its sha256 would not match either: the size is checked first
    size = (folder / "expert.safetensors").stat().st_size
    refused(folder, f"expert.safetensors is {size} bytes, over the limit of 100")


def test_it_checks_the_size_of_latentry_json_before_reading_it(folder):
    (folder / "latentry.json").write_text(" " * hub.MAX_FOLDER_TEXT_BYTES + "{}")
    refused(folder, "latentry.json is .* bytes, over the limit of")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "latentry.json must be a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "latentry.json is nested more than 32 levels deep"),
        ('{"sha256": ', "latentry.json is not valid JSON"),
        ("\xff", "latentry.json is not UTF-8 text"),
    ],
    ids=["list", "deep", "truncated", "not-utf8"],
)
def test_it_refuses_latentry_json_that_is_not_a_bounded_object(folder, text, message):
    (folder / "latentry.json").write_bytes(text.encode("latin-1"))
    refused(folder, message)


def test_it_refuses_front_matter_nested_too_deeply(folder):
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("---\n", "---\ndeep: " + "[" * 5000, 1))
    refused(folder, "README.md's front matter is nested too deeply")


def test_it_keeps_only_figures_from_the_card_as_claims(folder, bob):
    card = (folder / "README.md").read_text()
    hostile = card.replace("  latency_ratio: 1.12", "  latency_ratio: {a: [1, 2, {b: 3}]}")
    assert hostile != card
    (folder / "README.md").write_text(hostile)
    Expert.objects.filter(name="pydoc").delete()  # the original: bytes not published here
    import_(folder, "--owner", "bob")
    claims = ExpertVersion.objects.get(expert__owner=bob).claimed_metrics
    assert "latency_ratio" not in claims and claims["benchmark_gain"] == 6.5
