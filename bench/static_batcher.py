"""Shared decode batches: requests that arrive together are generated together.

One thread per base model runs the decoder. It takes the first waiting request, gathers what
else keeps arriving (up to ``max_batch``), and generates them as one batch: the LoRA experts'
latents come from the batch's one prefill (each row with its own expert's deltas), decoding is
shared, and a request's output does not depend on its batch-mates (coprocessor.generate).
"""

import collections
import queue
import threading
import time
from concurrent.futures import Future

from coprocessor.generate import generate


class Batcher:
    def __init__(self, decoder, eos_token_id, *, max_batch=16, wait_s=0.005, max_wait_s=0.05):
        self.decoder = decoder
        self.eos_token_id = eos_token_id
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_wait_s = max(max_wait_s, wait_s)
        self.waiting = queue.Queue()
        self.thread = None
        self.lock = threading.Lock()
        self.closed = False
        self.batch_sizes = collections.deque(maxlen=1000)  # recent batch sizes, for benches

    def submit(self, request):
        """Queue a coprocessor.generate.Request; the Future gives its Generation."""
        future = Future()
        with self.lock:
            if self.closed:  # its model was replaced: the caller asks the pool again
                raise RuntimeError("this base model was reloaded; send the request again")
            self.waiting.put((request, future))
        self._ensure_running()
        return future

    def _ensure_running(self):
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
                self.thread.start()

    def stop(self):
        """Serve what is queued, then end; later submits are refused."""
        with self.lock:
            self.closed = True
            self.waiting.put(None)

    def _run(self):
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = [first]
            self._gather(batch)
            self.batch_sizes.append(len(batch))
            requests = [request for request, _ in batch]
            try:
                outputs = generate(self.decoder, requests, eos_token_id=self.eos_token_id)
            except Exception as exc:  # every waiting caller learns of it; the thread lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), output in zip(batch, outputs, strict=True):
                future.set_result(output)

    def _gather(self, batch):
        """Take more requests while they keep coming (each arrival waits ``wait_s`` more for
        the next), for at most ``max_wait_s`` in all."""
        started = time.monotonic()
        deadline = started + self.wait_s
        while len(batch) < self.max_batch:
            try:
                item = self.waiting.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return
            if item is None:
                self.waiting.put(None)
                return
            batch.append(item)
            deadline = min(time.monotonic() + self.wait_s, started + self.max_wait_s)
