"""JSON from outside, read within bounds: the one loader for request bodies, form fields,
expert files' headers and metadata, Hub folders' latentry.json and dataset lines.

Python's ``json`` recurses once per nesting level, so a body of a few hundred thousand
brackets raises RecursionError (a 500) instead of a parse error. ``loads`` measures the size
and the nesting before decoding: the nesting by counting brackets outside strings, without
recursion, so decoding only ever sees JSON it can finish.
"""

import json
import re
from itertools import accumulate

# Deeper than any document Latentry reads (a chat request nests 4 levels, a safetensors
# header 3); the registry's request bodies take LATENTRY_JSON_MAX_DEPTH.
MAX_DEPTH = 32

# A JSON string (possessive: a string that never closes is not retried from every quote).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*+"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class Refused(ValueError):
    """JSON refused before decoding; the message says which bound it is past."""


class TooDeep(Refused):
    pass


class TooLarge(Refused):
    pass


def loads(text, *, max_depth=MAX_DEPTH, max_bytes=None, **options):
    """``json.loads(text, **options)`` within bounds: TooLarge past ``max_bytes`` (UTF-8
    bytes; None: no bound), TooDeep past ``max_depth`` levels (``[]`` is one),
    json.JSONDecodeError for text that is not JSON. All three are ValueError."""
    if max_bytes is not None and _size(text) > max_bytes:
        raise TooLarge(f"is over the limit of {max_bytes} bytes")
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError too
    if depth(text, stop_past=max_depth) > max_depth:
        raise TooDeep(f"is nested more than {max_depth} levels deep")
    try:
        return json.loads(text, **options)
    except RecursionError:  # max_depth set beyond what the interpreter can decode
        raise TooDeep("is nested too deeply to decode") from None


def depth(text, stop_past=None):
    """The deepest nesting of brackets outside strings in ``text`` (0 for a scalar); once it
    is past ``stop_past``, that depth at once: a body of 200,000 brackets is refused after 33
    of them, not after counting all."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    deepest = 0
    for level in accumulate(_STEP[c] for c in brackets):
        if level > deepest:
            deepest = level
            if stop_past is not None and deepest > stop_past:
                break
    return deepest


def _size(text):
    if isinstance(text, bytes | bytearray):
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
