"""The engine thread: the only code that touches the :class:`specdec.engine.SpeculativeEngine` (it is not
thread-safe). HTTP handlers talk to it through a thread-safe inbox (:meth:`EngineLoop.submit`,
:meth:`EngineLoop.cancel`) and get every :class:`specdec.request.StepOutput` of their request back through the
``deliver`` callback of their :class:`Job` (the HTTP layer passes ``loop.call_soon_threadsafe(queue.put_nowait,
...)``, so nothing here blocks on a client).

Each iteration: apply queued adds and cancels (a cancel frees the request's KV blocks at once, before the next
step), run one engine step if there is work (else sleep until woken), deliver the outputs, update the metrics.

Faults: an error inside one request is the engine's business (that request finishes with ``stop_reason="error"``);
if ``step()`` itself raises, every request the engine holds is cancelled and failed with the message, and the loop
goes on. Admission is bounded: at most ``max_batch + max_waiting`` requests are outstanding; beyond that
:meth:`submit` raises :class:`Overloaded` at once (HTTP 429). After :meth:`request_stop` every open request ends
with ``stop_reason="shutdown"`` and :meth:`submit` raises :class:`Unavailable` (HTTP 503).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from specdec.engine import SpeculativeEngine
from specdec.interfaces import Drafter
from specdec.kv_cache import PagedKVCache
from specdec.request import StepOutput
from specdec.sampling import SamplingParams
from specdec.server.metrics import ServerMetrics
from specdec.server.router import RoutingDrafter
from specdec.target import TargetModel

log = logging.getLogger("specdec.server")


class Overloaded(RuntimeError):
    """The wait queue is full (HTTP 429)."""


class Unavailable(RuntimeError):
    """The server is shutting down or its engine thread is gone (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """One request as the engine thread sees it.

    Attributes:
        prompt_ids: prompt token ids.
        params: sampling and stopping settings (``max_new_tokens`` included).
        drafter: name of an allowed drafter (a key of the loop's drafters).
        deliver: called from the engine thread with each :class:`StepOutput` of this request; must not block.
        submitted: ``time.perf_counter()`` at submission (TTFT starts here).
    """

    prompt_ids: list[int]
    params: SamplingParams
    drafter: str
    deliver: Callable[[StepOutput], None]
    submitted: float = field(default_factory=time.perf_counter)
    rid: int | None = None
    last_token_at: float | None = None


class EngineLoop:
    """Owns one engine over ``target`` and ``cache``; requests choose among ``drafters`` (see :mod:`.router`).

    Args:
        target, cache, eos_token_ids: as for :class:`SpeculativeEngine`.
        drafters: allowed drafter name -> drafter (``None``: autoregressive).
        metrics: where the loop records what it sees.
        max_waiting: requests that may wait beyond the ``max_batch`` running ones.
        engine_kwargs: ``max_batch``, ``max_tree_nodes``, ``max_step_tokens``, ``acceptance``.
    """

    def __init__(self, target: TargetModel, cache: PagedKVCache, drafters: Mapping[str, Drafter | None],
                 eos_token_ids: Sequence[int], metrics: ServerMetrics, max_waiting: int = 64,
                 idle_wait_s: float = 0.05, **engine_kwargs) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.router = RoutingDrafter(drafters, self._drafter_of_seq, target.vocab_size)
        self.engine = SpeculativeEngine(target, cache, self.router, eos_token_ids, **engine_kwargs)
        self.cache, self.metrics = cache, metrics
        self.max_batch, self.max_waiting = self.engine.scheduler.max_batch, max_waiting
        self.idle_wait_s = idle_wait_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: deque[tuple[str, Job]] = deque()  # guarded by _lock
        self._outstanding = 0  # guarded by _lock: submitted and not yet finished
        self._stopping = False
        self._jobs: dict[int, Job] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="specdec-engine", daemon=True)
        self._snapshot: dict = {}
        self._publish()

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def check_fits(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """``ValueError`` naming the limit if the request could never run (reads constants only: thread-safe)."""
        self.engine.scheduler.check_fits(prompt_tokens, max_new_tokens, self.engine.target.max_positions)

    def room(self, prompt_tokens: int) -> int:
        """Most new tokens a request with this prompt may ask for (context and cache limits)."""
        limit = min(self.engine.target.max_positions, self.cache.capacity_tokens)
        return limit - prompt_tokens - self.engine.max_tree_nodes

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`Overloaded` if ``max_batch + max_waiting`` requests are outstanding,
        :class:`Unavailable` when shutting down."""
        with self._lock:
            if self._stopping or not self._thread.is_alive():
                raise Unavailable("the server is shutting down; no new requests are accepted")
            limit = self.max_batch + self.max_waiting
            if self._outstanding >= limit:
                raise Overloaded(f"server overloaded: {self._outstanding} requests in flight, the limit is {limit} "
                                 f"({self.max_batch} running + {self.max_waiting} waiting, --max-waiting); "
                                 "retry later")
            self._outstanding += 1
            self._inbox.append(("add", job))
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """Cancel ``job`` (idempotent; a finished job is left alone); its blocks are freed before the next step."""
        with self._lock:
            self._inbox.append(("cancel", job))
        self._wake.set()

    def request_stop(self) -> None:
        """End every open request (``stop_reason="shutdown"``) and stop the thread; returns at once."""
        self.stop_soon()
        self._wake.set()

    def stop_soon(self) -> None:
        """:meth:`request_stop` without waking the thread: takes no lock, so it is safe inside a signal handler
        (the handler may interrupt the main thread while it holds a lock); the thread notices within
        ``idle_wait_s`` when idle, after the current step when busy."""
        self._stopping = True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; ``True`` if it did."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> dict:
        """Queue and cache counters as of the last iteration (a new dict each time: safe to read anywhere)."""
        return dict(self._snapshot)

    # ------------------------------------------------------------------ engine thread
    def _drafter_of_seq(self, seq_id: int) -> str:
        for req in self.engine.scheduler.running:
            if req.seq_id == seq_id:
                return self._jobs[req.request_id].drafter
        raise ValueError(f"sequence {seq_id} belongs to no running request")

    def _run(self) -> None:
        try:
            while True:
                try:
                    with self._lock:
                        commands, self._inbox = list(self._inbox), deque()
                        stopping = self._stopping
                    for kind, job in commands:
                        if kind == "add":
                            self._add(job)
                        else:
                            self._cancel(job)
                    if stopping:
                        break
                    if self.engine.has_work():
                        self._step()
                    else:
                        self._publish()
                        self._wake.wait(self.idle_wait_s)
                        self._wake.clear()
                except Exception as err:  # a bug in this loop must not stop serving: fail what is open
                    log.exception("engine loop iteration failed")
                    self._fail_all(f"engine loop error: {type(err).__name__}: {err}")
                    self._wake.wait(self.idle_wait_s)  # a persistent fault must not spin the CPU
        finally:
            self._shutdown()

    def _add(self, job: Job) -> None:
        try:
            job.rid = self.engine.add_request(job.prompt_ids, job.params)
        except Exception as err:  # the HTTP layer checks first; this is the last line
            self._end(job, StepOutput(-1, [], True, "error", f"{type(err).__name__}: {err}"))
            return
        self._jobs[job.rid] = job
        self.metrics.admitted(job.drafter, len(job.prompt_ids))

    def _cancel(self, job: Job) -> None:
        if job.rid is not None and job.rid in self._jobs:
            with contextlib.suppress(ValueError):  # finished in the meantime
                self.engine.cancel(job.rid)  # frees the blocks now; the next step reports "cancelled"

    def _step(self) -> None:
        steps, preempted = self.engine.steps, self.engine.preemptions
        try:
            outputs = self.engine.step()
        except Exception as err:
            log.exception("engine step failed")
            self._fail_all(f"engine step failed: {type(err).__name__}: {err}")
            return
        now = time.perf_counter()
        for out in outputs:
            self._on_output(out, now)
        alloc = self.cache.allocator
        self.metrics.step(self.engine.num_running, self._waiting(), alloc.num_free, alloc.num_blocks,
                          self.engine.steps - steps, self.engine.preemptions - preempted)
        self._publish()

    def _on_output(self, out: StepOutput, now: float) -> None:
        job = self._jobs.get(out.request_id)
        if job is None:
            return  # already failed by _fail_all
        gap = None
        if out.new_tokens:
            if job.last_token_at is None:
                self.metrics.first_token(job.drafter, now - job.submitted)
            else:
                gap = now - job.last_token_at
            job.last_token_at = now
        self.metrics.output(job.drafter, len(out.new_tokens), out.accepted, gap)
        if out.finished:
            del self._jobs[out.request_id]
            if out.stats is not None:
                self.metrics.request_stats(job.drafter, out.stats)
            self._end(job, out)
        else:
            self._send(job, out)

    def _fail_all(self, message: str) -> None:
        for rid, job in list(self._jobs.items()):
            with contextlib.suppress(Exception):
                self.engine.cancel(rid)
            del self._jobs[rid]
            self._end(job, StepOutput(rid, [], True, "error", message))

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            commands, self._inbox = list(self._inbox), deque()
        pending = [job for kind, job in commands if kind == "add"]
        for rid, job in list(self._jobs.items()):
            with contextlib.suppress(Exception):
                self.engine.cancel(rid)
            pending.append(job)
        self._jobs.clear()
        for job in pending:
            self._end(job, StepOutput(-1 if job.rid is None else job.rid, [], True, "shutdown",
                                      "the server is shutting down"))
        self._publish()

    def _end(self, job: Job, out: StepOutput) -> None:
        with self._lock:
            self._outstanding -= 1
        self._send(job, out)

    def _send(self, job: Job, out: StepOutput) -> None:
        try:
            job.deliver(out)
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            log.debug("could not deliver an output of request %s", out.request_id, exc_info=True)

    def _waiting(self) -> int:
        with self._lock:
            inbox = sum(1 for kind, _ in self._inbox if kind == "add")
        return self.engine.num_waiting + inbox

    def _publish(self) -> None:
        alloc = self.cache.allocator
        self._snapshot = {"running": self.engine.num_running, "waiting": self._waiting(),
                          "kv_blocks_free": alloc.num_free, "kv_blocks_total": alloc.num_blocks,
                          "engine_steps": self.engine.steps, "preemptions": self.engine.preemptions,
                          "open_requests": len(self._jobs)}
        self.metrics.set_queues(self.engine.num_running, self._waiting(), alloc.num_free, alloc.num_blocks)
