"""Server-side batching of generation requests: one worker thread per decoder run takes the requests
waiting (up to `max_batch`, after a short gather window) and decodes them together
(`inference.batched.generate_ragged`), handing each token to its request as it is produced.
Requests that arrive while a batch runs form the next one (static batching)."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from ..inference.batched import Sampling, generate_ragged
from ..inference.generate import gemv_layout


@dataclass
class Request:
    ids: list[int]
    opts: Sampling
    deliver: object  # callable(kind, value), called from the worker thread: ("token", id), ("done", None), ("error", msg)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """Decodes the requests of one run, `max_batch` at a time."""

    def __init__(self, run, max_batch: int = 16, gather_s: float = 0.005):
        self.run, self.max_batch, self.gather_s = run, max(1, max_batch), gather_s
        self.q: queue.Queue[Request] = queue.Queue()
        self.batches = 0  # how many batches ran, and their sizes (for the tests and the benchmark)
        self.sizes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{run.name}", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        self.q.put(req)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _take(self) -> list[Request]:
        try:
            first = self.q.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.gather_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
            except queue.Empty:
                break
        return [r for r in batch if not r.cancelled.is_set()]

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        self.batches += 1
        self.sizes.append(len(batch))
        r = self.run
        # decoding's weight layout (generate.gemv_layout: 1.9x on the CPU's matrix-vector products),
        # switched under the run's lock, so no other endpoint's forward pass sees it change
        layout = gemv_layout(r.model)
        with r.lock:
            layout.__enter__()
        try:
            steps = generate_ragged(r.model, [q.ids for q in batch], [q.opts for q in batch], eos_id=r.tok.eos_id)
            while True:
                with r.lock:
                    row = next(steps, None)
                if row is None:
                    break
                for q, t in zip(batch, row):
                    if t is not None and not q.cancelled.is_set():
                        q.deliver("token", t)
                if all(q.cancelled.is_set() for q in batch):
                    break
            for q in batch:
                q.deliver("done", None)
        except Exception as e:  # a failed batch fails its requests, not the server
            for q in batch:
                q.deliver("error", str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            with r.lock:
                layout.__exit__(None, None, None)
