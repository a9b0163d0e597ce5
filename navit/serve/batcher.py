"""Dynamic batching: one queue of every request's inputs, and a thread that packs and runs them.

Requests put their inputs (:class:`WorkItem`, one per image, clip or text) into one queue. The
batcher thread waits until the inputs like the oldest one (same endpoint and options) hold
``max_batch_tokens`` tokens or the oldest has waited ``max_wait_ms``, picks which go into one
forward, runs it off the event loop and settles each input's future on its request's loop. A
request's inputs need not share a forward: a large request spans several.

How inputs are picked (``mode``):

* ``packed``: first fit, oldest first, into rows sized to what waits (navit.serve.layout: the
  row length, at most the model's ``max_tokens``, that packs the most tokens with the least
  padding within ``max_batch_tokens``); each image keeps its own resolution and several share a row.
* ``padded``: one image per row, every row padded to the longest, rows added while rows x
  longest stays within ``max_batch_tokens`` (batching by count, as fixed-size servers do).
* ``single``: one request per forward (its inputs packed first fit), no waiting.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from navit.packing import pack
from navit.serve.layout import packed_rows
from navit.serve.limits import ServeError
from navit.serve.metrics import ServeMetrics

MODES = ("packed", "padded", "single")
MAX_TEXTS = 256  # texts in one forward of the text tower


@dataclass
class BatchingConfig:
    """How the server batches; each field is a ``navit serve`` flag."""

    batching: str = "packed"
    max_batch_tokens: int = 4096
    max_wait_ms: float = 10.0
    budget: int | None = None  # tokens per image by default (None: native resolution)

    def __post_init__(self) -> None:
        if self.batching not in MODES:
            raise ValueError(f"--batching {self.batching!r}; expected one of {MODES}")
        if self.max_batch_tokens < 1 or self.max_wait_ms < 0:
            raise ValueError(f"--max-batch-tokens must be >= 1 and --max-wait-ms >= 0, got "
                             f"{self.max_batch_tokens} and {self.max_wait_ms}")  # fmt: skip
        if self.budget is not None and not 1 <= self.budget <= self.max_batch_tokens:
            raise ValueError(f"--budget {self.budget} must be in 1..--max-batch-tokens ({self.max_batch_tokens})")


@dataclass(eq=False)
class Ticket:
    """One request: the loop its futures live on, and whether its client went away."""

    loop: asyncio.AbstractEventLoop
    cancelled: bool = False


@dataclass(eq=False)
class WorkItem:
    """One input of a request: what it runs through (``kind``: predict, embed or text) and with
    which options, its tokens (an ``Example``) or text, the decoded source, and its future."""

    kind: str
    options: tuple[tuple[str, Any], ...]
    payload: Any
    source: Any
    tokens: int
    ticket: Ticket
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[Any, ...]:
        return self.kind, self.options


class Batcher:
    """The queue and the thread that empties it through ``served`` (a :class:`ServedModel`)."""

    def __init__(self, served: Any, config: BatchingConfig, max_queue: int, metrics: ServeMetrics) -> None:
        self.served, self.config, self.max_queue, self.metrics = served, config, max_queue, metrics
        self.seq_len = served.processor.max_tokens
        if config.max_batch_tokens < self.seq_len:
            raise ValueError(f"--max-batch-tokens {config.max_batch_tokens} is below the model's max_tokens "
                             f"({self.seq_len}): give at least {self.seq_len}")  # fmt: skip
        self.queue: deque[WorkItem] = deque()
        self.pending = 0  # queued or in a forward
        self.stopping = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="navit-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Take no more work, finish what is queued and in a forward, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def submit(self, items: list[WorkItem]) -> None:
        """Queue a request's inputs, or answer 503 when the server stops or the queue is full."""
        with self.cond:
            if self.stopping:
                raise ServeError(503, "shutting-down", "the server is shutting down", {"Retry-After": "1"})
            if self.pending + len(items) > self.max_queue:
                raise ServeError(503, "overloaded", f"the server has {self.pending} images queued and takes at most "
                                 f"--max-queue {self.max_queue}; retry later", {"Retry-After": "1"})  # fmt: skip
            self.queue.extend(items)
            self.pending += len(items)
            self._gauges()
            self.cond.notify_all()

    def cancel(self, ticket: Ticket) -> int:
        """Drop a request's queued inputs (its client went away); the number dropped."""
        with self.cond:
            ticket.cancelled = True
            kept = deque(item for item in self.queue if item.ticket is not ticket)
            dropped = len(self.queue) - len(kept)
            self.queue, self.pending = kept, self.pending - dropped
            self._gauges()
            self.cond.notify_all()
        self.metrics.dropped.inc(dropped)
        return dropped

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.pending.set(self.pending)

    # -- the thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            picked = self._next()
            if picked is None:
                return
            self._run(*picked)

    def _next(self) -> tuple[list[WorkItem], int, int | None] | None:
        """The next forward's inputs, its sequence length and examples per row; None once
        stopping with nothing left. Waits (bounded) for the batch to fill or the oldest to age."""
        with self.cond:
            while True:
                if not self.queue:
                    if self.stopping:
                        return None
                    self.cond.wait(0.5)
                    continue
                head = self.queue[0]
                if self.config.batching != "single" and not self.stopping:
                    wait = head.enqueued + self.config.max_wait_ms / 1000 - time.monotonic()
                    if wait > 0 and self._queued_tokens(head.key) < self.config.max_batch_tokens:
                        self.cond.wait(wait)
                        continue  # the head may have been dropped meanwhile
                chosen, seq_len, per_row = self._select(head)
                taken = set(map(id, chosen))
                self.queue = deque(item for item in self.queue if id(item) not in taken)
                self._gauges()
                return chosen, seq_len, per_row

    def _queued_tokens(self, key: tuple[Any, ...]) -> int:
        return sum(item.tokens for item in self.queue if item.key == key)

    def _select(self, head: WorkItem) -> tuple[list[WorkItem], int, int | None]:
        """Which queued inputs like ``head`` go into one forward (``head`` always does)."""
        budget = self.config.max_batch_tokens
        same, total = [], 0
        for item in self.queue:  # oldest first; at most twice the budget is considered
            if item.key == head.key and (self.config.batching != "single" or item.ticket is head.ticket):
                if same and total + item.tokens > 2 * budget:
                    break
                same.append(item)
                total += item.tokens
        if head.kind == "text":
            return same[:MAX_TEXTS], 0, None
        if self.config.batching == "padded":
            chosen, longest = [], 0
            for item in same:
                if chosen and max(longest, item.tokens) * (len(chosen) + 1) > budget:
                    break
                chosen.append(item)
                longest = max(longest, item.tokens)
            return chosen, longest, 1
        taken, seq_len = packed_rows([item.tokens for item in same], budget, self.seq_len)
        return [same[i] for i in taken], seq_len, None

    def _run(self, chosen: list[WorkItem], seq_len: int, per_row: int | None) -> None:
        """One forward over ``chosen``; each input's result (or the error) goes to its future."""
        now = time.monotonic()
        for item in chosen:
            self.metrics.queue_wait.observe(now - item.enqueued)
        kind, options = chosen[0].kind, dict(chosen[0].options)
        start = time.perf_counter()
        try:
            if kind == "text":
                results = self.served.embed_texts([item.payload for item in chosen])
            else:
                batch = pack([item.payload for item in chosen], seq_len, max_examples_per_seq=per_row).batch
                self.metrics.fill.observe(batch.num_real_tokens / batch.segment_ids.numel())
                if kind == "predict":
                    results = self.served.predict(batch, [item.source for item in chosen], options)
                else:
                    results = self.served.embed(batch)
            outcomes = [(result, None) for result in results]
        except Exception as error:  # the forward failed: every input of it gets the error
            outcomes = [(None, error)] * len(chosen)
        self.metrics.forward.observe(time.perf_counter() - start)
        self.metrics.batches.inc()
        self.metrics.batch_images.observe(len(chosen))
        self.metrics.images.inc(len(chosen))
        self.metrics.tokens.inc(sum(item.tokens for item in chosen))
        for item, (result, error) in zip(chosen, outcomes):
            _settle(item, result, error)
        with self.cond:
            self.pending -= len(chosen)
            self._gauges()


def _settle(item: WorkItem, result: Any, error: BaseException | None) -> None:
    def done() -> None:
        if not item.future.done():
            item.future.set_exception(error) if error is not None else item.future.set_result(result)

    try:
        item.ticket.loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop is closed: nobody waits for it any more
        pass
