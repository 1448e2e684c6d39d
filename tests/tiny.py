"""Tiny random decoders, a word-level tokenizer and phrase corpora: what tests and benches' smoke
runs compute with. Free of Django, so a bench can import it before (or without) setting Django up.
"""

import torch

# Each family imports its transformers classes when first built: a bench's smoke run needs one,
# and every model module costs its process a fraction of a second to import.

VOCAB = 64


# llama and qwen2 share a shape: grouped-query attention (4 heads, 2 kv heads), gated MLP.
LLAMA_SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_llama(**overrides):
    """The tiny llama; ``overrides`` change its config (a longer position table, say)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE | overrides))


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**LLAMA_SHAPE))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    )


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def frozen(make, seed=0):
    torch.manual_seed(seed)
    model = make()
    return model.eval().requires_grad_(False)


def phrase_corpus(n_phrases=12, phrase_len=6, length=4000, seed=0, vocab=VOCAB):
    """Random phrases (over the first ``vocab`` token ids) repeated in random order."""
    generator = torch.Generator().manual_seed(seed)
    phrases = [
        torch.randint(0, vocab, (phrase_len,), generator=generator) for _ in range(n_phrases)
    ]
    order = torch.randint(0, n_phrases, (length // phrase_len,), generator=generator)
    return torch.cat([phrases[i] for i in order.tolist()])


def word_tokenizer():
    """A small word-level fast tokenizer, built offline, for base-model loading tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for i in range(2, VOCAB):
        vocab[f"w{i}"] = i
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    made = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    made.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # words only
    return made


def phrase_text(**kwargs):
    """phrase_corpus as text for word_tokenizer: token id i is the word "w<i>" (i >= 2)."""
    ids = phrase_corpus(**kwargs, vocab=VOCAB - 2) + 2
    return " ".join(f"w{i}" for i in ids.tolist())
