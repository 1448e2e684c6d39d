"""What a serving process keeps: each base model loaded once, and an LRU cache of experts.

Experts never change the shared decoder: their LoRA deltas are added by hooks, per batch row,
only inside the forward of the batch that uses them (``coprocessor.lora.row_adapters``), so
concurrent forwards through one decoder each see their own experts or none.
"""

import dataclasses
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from django.conf import settings

from coprocessor import artifact, base_models, routing
from coprocessor.engine import Engine, Limits
from coprocessor.expert import Coprocessor
from coprocessor.lora import install_lora_hooks
from coprocessor.watch import reference_ids
from registry import storage
from registry.models import BaseModel


class ExpertUnavailable(Exception):
    """The expert could not be used for this request; the message says why."""


@dataclass
class LoadedBase:
    record: BaseModel
    decoder: torch.nn.Module
    tokenizer: object
    engine: Engine = field(repr=False)
    # routing_centre once computed; one holder for this load and its copies (``ModelPool.base``)
    centre_held: list = field(default_factory=list, repr=False)

    @property
    def routing_centre(self):
        """What ``auto`` measures from (``routing.centre``): one pass over the reference text,
        at the first ``auto`` request rather than at every load (two computing it at once
        get the same tensor)."""
        if not self.centre_held:
            self.centre_held.append(routing.centre(self.decoder, reference_ids(self.tokenizer)))
        return self.centre_held[0]


class ExpertCache:
    """Experts by sha256, least recently used first out once over ``capacity_bytes``.

    A load runs once per key even when many requests ask for it at the same time; callers
    wait for it at most ``timeout`` seconds (the load goes on and fills the cache for later).
    """

    def __init__(self, capacity_bytes):
        self.capacity = capacity_bytes
        self.items = OrderedDict()  # key -> (expert, bytes)
        self.size = 0
        self.loading = {}
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="expert-load")
        self.hits = self.misses = 0

    def get(self, key, load, timeout=None):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                self.hits += 1
                return self.items[key][0]
            self.misses += 1
            future = self.loading.get(key)
            if future is None:
                future = self.loading[key] = self.executor.submit(self._load, key, load)
        return future.result(timeout=timeout)

    def _load(self, key, load):
        try:
            expert, nbytes = load()
            with self.lock:
                self.items[key] = (expert, nbytes)
                self.size += nbytes
                while self.size > self.capacity and len(self.items) > 1:
                    _, (_, dropped) = self.items.popitem(last=False)
                    self.size -= dropped
            return expert
        finally:
            with self.lock:
                self.loading.pop(key, None)

    def clear(self):
        with self.lock:
            self.items.clear()
            self.size = 0


class ModelPool:
    def __init__(self):
        self.bases = {}
        self.lock = threading.Lock()
        self.experts = ExpertCache(settings.LATENTRY_EXPERT_CACHE_BYTES)

    def base(self, record):
        """The loaded base model of a registry BaseModel (loaded on first use, and again if
        the row now names other weights). It carries ``record`` itself: a row re-created
        since the load (a re-import) has another id, and lookups by it must use the new one."""
        loaded = self.bases.get(record.slug)
        if loaded is None or loaded.record.fingerprint != record.fingerprint:
            with self.lock:
                loaded = self.bases.get(record.slug)
                if loaded is None or loaded.record.fingerprint != record.fingerprint:
                    if loaded is not None:  # new weights: experts built on the old ones go too
                        loaded.engine.stop()
                        self.experts.clear()
                    loaded = self.bases[record.slug] = self._load(record)
        return loaded if loaded.record == record else dataclasses.replace(loaded, record=record)

    def _load(self, record):
        device = settings.LATENTRY_DEVICE or base_models.default_device()
        if device == "cpu":
            base_models.keep_freed_memory()
        decoder, tokenizer = base_models.load_verified(
            record.weights_location,
            record.fingerprint,
            dtype=base_models.serving_dtype(device, settings.LATENTRY_DTYPE),
            device=device,
        )
        # Hooks go in now, before any request runs through the decoder: adding them later
        # (with the first expert) would change it under concurrent forwards.
        install_lora_hooks(decoder)
        return LoadedBase(
            record, decoder, tokenizer, Engine(decoder, tokenizer.eos_token_id, limits())
        )

    def expert(self, base, version):
        """The Coprocessor of an ExpertVersion; ExpertUnavailable with the reason if it cannot
        be had within the load budget."""

        def load():
            return load_expert(base, version)

        # An expert is built on one loaded decoder's modules: the key names both.
        key = (base.record.slug, version.sha256)
        try:
            return self.experts.get(key, load, timeout=settings.LATENTRY_EXPERT_LOAD_TIMEOUT_S)
        except TimeoutError:
            raise ExpertUnavailable("the expert took too long to load") from None
        except artifact.ArtifactError as exc:
            version.reject(str(exc))  # the same bytes fail every time: never route to it again
            raise ExpertUnavailable(f"the expert file failed validation: {exc}") from None
        except (storage.StorageUnavailable, OSError) as exc:
            raise ExpertUnavailable(f"the expert could not be read from storage: {exc}") from None
        except Exception as exc:  # whatever a bad file makes the loader raise: degrade
            raise ExpertUnavailable(f"the expert could not be loaded: {exc}") from None


def limits():
    """The engine's limits from the settings (read when a base model loads)."""
    return Limits(
        max_rows=settings.LATENTRY_ENGINE_MAX_ROWS,
        cache_columns=settings.LATENTRY_ENGINE_CACHE_COLUMNS,
        max_waiting=settings.LATENTRY_ENGINE_MAX_WAITING,
        queue_timeout_s=settings.LATENTRY_ENGINE_QUEUE_TIMEOUT_S,
        prefill_tokens=settings.LATENTRY_ENGINE_PREFILL_TOKENS,
        batches=settings.LATENTRY_ENGINE_BATCHES,
        caller_columns=settings.LATENTRY_ENGINE_CALLER_COLUMNS,
        overtake_s=settings.LATENTRY_ENGINE_OVERTAKE_S,
        prefill_chunk=settings.LATENTRY_ENGINE_PREFILL_CHUNK,
        prefill_share=settings.LATENTRY_ENGINE_PREFILL_SHARE,
    )


def load_expert(base, version):
    """Read, check (sha256, then the header against the base model) and build an expert."""
    data = version.read_verified()
    return Coprocessor.from_bytes(base.decoder, data, base.record.spec()), len(data)


def warm_up():
    """Load every served base model and run one tiny generation through it, so the first
    request does not pay for loading (config/asgi.py and gunicorn.conf.py call this). A web
    process that forwards to a serving process (LATENTRY_SERVING_URL) loads none."""
    from coprocessor.generate import Request

    if settings.LATENTRY_SERVING_URL:
        return
    for record in BaseModel.objects.exclude(weights_location=""):
        loaded = pool().base(record)
        loaded.engine.submit(Request(prompt_ids=[0, 0], max_new_tokens=1)).future.result()


_pool = None
_pool_lock = threading.Lock()


def pool():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ModelPool()
        return _pool


def reset(wait_s=None):
    """Forget every loaded model (tests), their engines stopped; with ``wait_s``, wait up to
    that long for each engine's loop to end (a process about to exit must: a thread still
    inside torch when the interpreter ends aborts it)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            for base in _pool.bases.values():
                base.engine.stop(wait_s)
        _pool = None
