"""The upload probe: an expert file run once through its base model before it is published.

The header checks and the NaN/Inf scan read the file; they cannot see values that are finite
and still too large for D's arithmetic (keys and values far too big overflow attention or
the final norm). Those show only when D runs with the expert attached, so the probe
generates a few tokens from a fixed prompt the way serving would (``generate.generate``: the
same prefill, prefix, latents and checks) and refuses the file when its row broke.
"""

import functools

from .artifact import ArtifactError
from .base_models import load_verified
from .expert import Coprocessor
from .generate import Request, generate

# Fixed, so that a file is refused or not whoever uploads it and whenever: prose that any base
# model's tokenizer splits into a few dozen ordinary tokens.
PROMPT = "The quick brown fox jumps over the lazy dog. Explain what a Python list is, briefly."
NEW_TOKENS = 4  # the prefill and a few decode steps: where a broken cache shows


@functools.lru_cache(maxsize=1)
def base_model(weights_location, fingerprint):
    """(decoder, tokenizer) to probe with: CPU, float32, loaded once per process."""
    return load_verified(weights_location, fingerprint)


def check(data, decoder, tokenizer, spec):
    """ArtifactError naming the problem when the expert in ``data`` (a file's bytes, for the
    base model ``spec`` describes) breaks ``decoder``'s numbers, or fails, on the fixed
    prompt."""
    try:
        expert = Coprocessor.from_bytes(decoder, data, spec)
    except Exception as exc:  # whatever a file that passed validation still makes it raise
        raise ArtifactError(f"the expert cannot be built on the base model: {exc}") from None
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"] or [0, 0]
    outcome = generate(decoder, [Request(list(ids), expert, NEW_TOKENS)])[0]
    if outcome.broke_numbers:
        raise ArtifactError(
            "the expert breaks the base model's numbers on a test prompt (its latents or "
            "logits are not finite): its values are finite but too large for the base "
            "model's arithmetic"
        )
    if problem := outcome.degraded or outcome.error:
        raise ArtifactError(f"the expert fails on a test prompt: {problem}")
