"""Prometheus metrics of one server (one ``CollectorRegistry`` per app, so several apps in one process, as in the
tests, never share counters). Served as text at ``GET /metrics``.

Every per-request series carries a ``drafter`` label (the name a request was served with). Definitions:

* ``specdec_tokens_per_step`` histogram: tokens one verification step produced for one request (accepted draft
  tokens + the bonus token). ``_sum / _count`` is tau (1.0 for ``none``).
* ``specdec_depth_tried_total`` / ``specdec_depth_accepted_total`` (label ``depth``): the counters of
  :mod:`specdec.stats` summed over finished requests; ``specdec_acceptance_rate_by_depth`` is their ratio.
* ``specdec_tree_nodes_total``: tree nodes verified by finished requests (root included); divided by their
  verification steps it is the mean tree size, the extra forward cost a drafter buys tau with.
* ``specdec_inter_token_latency_seconds``: the gap between two outputs of a request divided by the tokens in the
  later one, observed once per token (speculative steps deliver several tokens at once).
* ``specdec_time_to_first_token_seconds``: from admission to the server (after tokenization) to the first token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specdec.stats import RequestStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STEP_TOKEN_BUCKETS = tuple(float(i) for i in range(1, 17))
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)


class ServerMetrics:
    """All series of one server; every method is thread-safe (prometheus-client locks each series)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        d = ["drafter"]
        self.running = Gauge("specdec_requests_running", "requests in the engine's running batch", registry=r)
        self.waiting = Gauge("specdec_requests_waiting", "requests queued (server inbox + engine queue)", registry=r)
        self.peak_batch = Gauge("specdec_running_batch_peak", "largest running batch seen since start", registry=r)
        self.batch = Histogram("specdec_step_batch_size", "running requests per engine step", buckets=BATCH_BUCKETS,
                               registry=r)
        self.blocks_used = Gauge("specdec_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.blocks_free = Gauge("specdec_kv_blocks_free", "KV cache blocks free", registry=r)
        self.engine_steps = Counter("specdec_engine_steps", "engine steps (one target forward each)", registry=r)
        self.preemptions = Counter("specdec_preemptions", "requests preempted (blocks freed, re-prefilled later)",
                                   registry=r)
        self.tokens = Counter("specdec_generated_tokens", "tokens generated", d, registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "prompt tokens of admitted requests", d, registry=r)
        self.verify_steps = Counter("specdec_verification_steps", "per-request verification steps", d, registry=r)
        self.accepted = Counter("specdec_accepted_draft_tokens", "draft tokens accepted", d, registry=r)
        self.step_tokens = Histogram("specdec_tokens_per_step", "tokens per verification step (tau = sum/count)", d,
                                     buckets=STEP_TOKEN_BUCKETS, registry=r)
        self.tree_nodes = Counter("specdec_tree_nodes", "tree nodes verified (root included), finished requests",
                                  d, registry=r)
        self.depth_tried = Counter("specdec_depth_tried", "steps whose tree reached depth d with all above accepted",
                                   [*d, "depth"], registry=r)
        self.depth_accepted = Counter("specdec_depth_accepted", "steps that accepted a depth-d token", [*d, "depth"],
                                      registry=r)
        self.depth_rate = Gauge("specdec_acceptance_rate_by_depth", "depth_accepted / depth_tried", [*d, "depth"],
                                registry=r)
        self.ttft = Histogram("specdec_time_to_first_token_seconds", "arrival to first token", d,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("specdec_inter_token_latency_seconds", "gap between outputs per token", d,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("specdec_requests_finished", "requests ended, by finish reason", [*d, "reason"],
                                registry=r)
        self.errors = Counter("specdec_request_errors", "failed or refused requests, by kind", [*d, "kind"],
                              registry=r)
        self._depth_totals: dict[tuple[str, int], list[int]] = {}  # engine thread only
        self._peak = 0

    def step(self, running: int, waiting: int, blocks_free: int, blocks_total: int, engine_steps: int,
             preemptions: int) -> None:
        """After an engine step: queue and cache gauges; ``engine_steps``/``preemptions`` are increments."""
        self.set_queues(running, waiting, blocks_free, blocks_total)
        if running:
            self.batch.observe(running)
            if running > self._peak:
                self._peak = running
                self.peak_batch.set(running)
        if engine_steps:
            self.engine_steps.inc(engine_steps)
        if preemptions:
            self.preemptions.inc(preemptions)

    def set_queues(self, running: int, waiting: int, blocks_free: int, blocks_total: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.blocks_free.set(blocks_free)
        self.blocks_used.set(blocks_total - blocks_free)

    def output(self, drafter: str, tokens: int, accepted: int | None, gap_s: float | None) -> None:
        """One step output of a request: ``tokens`` new tokens; ``accepted`` draft tokens (``None``: prefill);
        ``gap_s`` seconds since the request's previous tokens (``None`` for the first ones)."""
        if tokens:
            self.tokens.labels(drafter).inc(tokens)
        if accepted is not None:
            self.verify_steps.labels(drafter).inc()
            self.accepted.labels(drafter).inc(accepted)
            self.step_tokens.labels(drafter).observe(accepted + 1)
        if gap_s is not None and tokens:
            per_token = gap_s / tokens
            for _ in range(tokens):
                self.itl.labels(drafter).observe(per_token)

    def first_token(self, drafter: str, seconds: float) -> None:
        self.ttft.labels(drafter).observe(seconds)

    def admitted(self, drafter: str, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(drafter).inc(prompt_tokens)

    def request_stats(self, drafter: str, stats: RequestStats) -> None:
        """A finished request's tree-size and acceptance-by-depth counters."""
        if stats.tree_nodes:
            self.tree_nodes.labels(drafter).inc(stats.tree_nodes)
        for depth, (tried, acc) in enumerate(zip(stats.depth_tried, stats.depth_accepted, strict=True), start=1):
            if not tried:
                continue
            self.depth_tried.labels(drafter, str(depth)).inc(tried)
            self.depth_accepted.labels(drafter, str(depth)).inc(acc)
            total = self._depth_totals.setdefault((drafter, depth), [0, 0])
            total[0] += tried
            total[1] += acc
            self.depth_rate.labels(drafter, str(depth)).set(total[1] / total[0])

    def finish(self, drafter: str, reason: str) -> None:
        self.finished.labels(drafter, reason).inc()

    def error(self, drafter: str, kind: str) -> None:
        self.errors.labels(drafter, kind).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
