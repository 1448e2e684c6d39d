"""Generation: plain requests equal the model's own greedy decoding; a mixed batch equals
each request served alone."""

import pytest
import torch

from coprocessor.decoder import prefill
from coprocessor.expert import Coprocessor, CoprocessorConfig, prefill_with_latents
from coprocessor.generate import Request, RunningBatch, generate, prompt_latents
from coprocessor.prefix import batch_prefixes
from tests.factories import FAMILIES, VOCAB, frozen, randomize


def reference_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    for _ in range(n):
        next_id = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_greedy_generation_matches_the_model(family):
    model = frozen(FAMILIES[family])
    prompts = [[5, 9, 2, 7, 3], [11], [4, 4, 8]]
    outputs = generate(model, [Request(p, max_new_tokens=6) for p in prompts])
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == reference_greedy(model, prompt, 6)
        assert output.finish_reason == "length"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mixed_batch_equals_each_request_alone(family):
    model = frozen(FAMILIES[family])
    first = randomize(Coprocessor(model, CoprocessorConfig(n_latents=3, lora_rank=2, seed=1)), 1)
    second = randomize(Coprocessor(model, CoprocessorConfig(n_latents=5, lora_rank=2, seed=2)), 2)
    requests = [
        Request([3, 8, 1, 9, 14, 2], expert=first, max_new_tokens=8),
        Request([7, 7], expert=None, max_new_tokens=5),
        Request([12, 5, 33], expert=second, max_new_tokens=8),
        Request([1, 2, 3, 4], expert=first, max_new_tokens=8, temperature=0.9, top_p=0.8, seed=42),
        Request([9], expert=second, max_new_tokens=4),
    ]
    batched = [o.token_ids for o in generate(model, requests)]
    alone = [generate(model, [r])[0].token_ids for r in requests]
    assert batched == alone


def test_an_expert_changes_what_is_generated():
    model = frozen(FAMILIES["llama"])
    expert = randomize(Coprocessor(model, CoprocessorConfig(n_latents=3, lora_rank=2)), 1)
    prompt = [3, 8, 1, 9, 14, 2]
    plain = generate(model, [Request(prompt, max_new_tokens=8)])[0].token_ids
    augmented = generate(model, [Request(prompt, expert=expert, max_new_tokens=8)])[0].token_ids
    assert augmented != plain


def test_generation_stops_at_eos_and_stop_tokens():
    model = frozen(FAMILIES["llama"])
    greedy = reference_greedy(model, [5, 9, 2], 6)
    first_new = next(k for k in range(1, 6) if greedy[k] not in greedy[:k])
    output = generate(
        model, [Request([5, 9, 2], max_new_tokens=6)], eos_token_id=greedy[first_new]
    )[0]
    assert output.token_ids == greedy[:first_new]
    assert output.finish_reason == "stop"
    output = generate(model, [Request([5, 9, 2], max_new_tokens=6, stop_ids=(greedy[first_new],))])[
        0
    ]
    assert output.token_ids == greedy[:first_new]


def test_sampling_is_reproducible_with_a_seed():
    model = frozen(FAMILIES["llama"])
    request = dict(prompt_ids=[1, 2, 3], max_new_tokens=10, temperature=1.0)
    a = generate(model, [Request(**request, seed=1)])[0].token_ids
    b = generate(model, [Request(**request, seed=1)])[0].token_ids
    c = generate(model, [Request(**request, seed=2)])[0].token_ids
    assert a == b
    assert a != c
    assert all(0 <= t < VOCAB for t in a)


def test_timings_are_reported():
    model = frozen(FAMILIES["llama"])
    output = generate(model, [Request([1, 2, 3], max_new_tokens=2)])[0]
    assert set(output.timings) == {"prefill_s", "decode_s"}


def mixed_experts(decoder, shapes):
    """Experts of the given (n_latents, lora_rank) with non-trivial weights."""
    return [
        randomize(Coprocessor(decoder, CoprocessorConfig(n_latents=n, lora_rank=r, seed=i)), i)
        for i, (n, r) in enumerate(shapes)
    ]


@pytest.mark.parametrize(
    "shapes",
    [[(2, 2), (3, 4)], [(2, 2), (2, 2)]],
    ids=["different shapes: grouped rows", "one shape: stacked bmm"],
)
@pytest.mark.parametrize("prompt_width", [7, 0], ids=["prompts", "one-token prompts"])
def test_latents_folded_into_the_prefill_equal_each_expert_alone(shapes, prompt_width):
    """One forward for a batch of mixed LoRA experts: the same cache as a plain prefill, each
    row's latents as its expert gives alone, plain rows untouched, for left-padded rows and
    for an empty prefix (prompts of one token)."""
    decoder = frozen(FAMILIES["llama"])
    experts = mixed_experts(decoder, shapes)
    rows = [experts[0], None, experts[1], experts[0]]
    ids = torch.randint(0, VOCAB, (4, prompt_width), generator=torch.Generator().manual_seed(0))
    visible = torch.ones_like(ids, dtype=torch.bool)
    if prompt_width:
        visible[1, :3] = visible[2, :5] = False
    with torch.no_grad():
        prefilled, z, gate = prefill_with_latents(decoder, ids, visible, rows)
        plain = prefill(decoder, ids, visible)
        for (k, v), (plain_k, plain_v) in zip(prefilled.past or [], plain.past or [], strict=True):
            # Padding positions hold values nobody sees; compare the visible ones.
            shown = visible[:, None, :, None].expand_as(k)
            torch.testing.assert_close(k[shown], plain_k[shown], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[shown], plain_v[shown], atol=1e-5, rtol=1e-5)
        assert torch.equal(prefilled.past_bias, plain.past_bias)
        assert torch.equal(prefilled.next_positions, plain.next_positions)
        for row, expert in enumerate(rows):
            if expert is None:
                continue
            index = torch.tensor([row])
            past = [(k[index], v[index]) for k, v in plain.past] if plain.past else None
            alone = expert.latents(past, plain.past_bias[index], plain.next_positions[index])
            count = expert.config.n_latents
            torch.testing.assert_close(z[row, :count], alone[0].float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gate[row, :count], expert.latent_head.gate)
            assert (gate[row, count:] < -1e30).all()
    assert (z[1] == 0).all() and (gate[1] < -1e30).all()


def test_a_decode_step_writes_its_column_in_place():
    """The running batch's cache has room for every token its rows can still add: steps write
    into it instead of copying the whole cache (transformers' DynamicLayer concatenates)."""
    model = frozen(FAMILIES["llama"])
    batch = RunningBatch(model)
    batch.admit([Request([5, 9, 2], max_new_tokens=6), Request([4, 8], max_new_tokens=3)])
    layer = batch.cache.layers[0]
    buffer, width = layer._keys.data_ptr(), batch.width
    batch.step()
    assert (layer._keys.data_ptr(), batch.width) == (buffer, width + 1)
    assert layer.keys.data_ptr() == buffer  # the keys D reads are a view of it
    while batch.rows:
        batch.step()  # rows leave: the cache is cut, with room for those that remain
        if batch.rows:
            remaining = max(r.request.max_new_tokens - len(r.tokens) for r in batch.rows)
            assert batch.cache.layers[0]._keys.shape[2] >= batch.width + remaining


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_latents_attach_hands_out_are_the_ones_serving_computes(kind):
    model = frozen(FAMILIES["llama"])
    config = CoprocessorConfig(n_latents=3, kind=kind, prefix_positions=2, lora_rank=2)
    expert = randomize(Coprocessor(model, config), 4)
    ids = [3, 8, 1, 9, 4]
    latents, gate = prompt_latents(model, expert, ids)
    # The expert's own pass of C over the prompt's cache (evaluation's route)
    prompt = torch.tensor([ids[:-1]])
    static = batch_prefixes([expert.prefix], torch.float32, "cpu")
    cache = prefill(model, prompt, torch.ones_like(prompt, dtype=torch.bool), prefix=static)
    with torch.no_grad():
        own = expert.latents(cache.past, cache.past_bias, cache.next_positions)[0]
    torch.testing.assert_close(latents, own, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gate, expert.gate_bias(1)[0])
