"""Load test of ``specdec serve``: N streamed chat requests at concurrency C, per drafter, against a server on this
machine (loopback only), or one this script starts (``--start-server``) on a free port and stops by its process id.

    python experiments/load_test.py --start-server --requests 32 --concurrency 1 4 8 --drafter none ngram \\
        --max-tokens 128 --out out/load_test.json

Per run (one concurrency x one drafter): throughput (completion tokens / wall time), time to first token and
inter-token latency p50/p99 as the client sees them (ITL: the gap between two streamed chunks; one chunk may carry
several tokens of a speculative step), time per output token p50/p99 ((latency - TTFT) / (tokens - 1) per request),
tau and the mean tree size per verification step from the server's ``/metrics`` (the run's share of
``specdec_tokens_per_step`` and ``specdec_tree_nodes_total``), errors, and KV blocks still in use after the run
(leaks). Prints a table and writes JSON. Every wait is bounded (``--timeout``, ``--run-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def load_prompts(path: Path | None) -> list[str]:
    from specdec.app.prompts import builtin_prompts_path
    from specdec.app.prompts import load_prompts as read

    return [p.text for p in read(path or builtin_prompts_path())]


def metric_sum(text: str, name: str, drafter: str | None) -> float:
    """Sum of ``name`` samples whose ``drafter`` label is ``drafter`` (``None``: all of them)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([\w:]+)\{(.*)\} (\S+)$", line)
        if m and m.group(1) == name and (drafter is None or f'drafter="{drafter}"' in m.group(2)):
            total += float(m.group(3))
    return total


async def one_request(http: httpx.AsyncClient, prompt: str, args: argparse.Namespace, drafter: str | None) -> dict:
    body: dict = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                  "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
    if drafter is not None:
        body["specdec"] = {"drafter": drafter}
    start = time.perf_counter()
    chunk_times: list[float] = []
    tokens = 0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body, timeout=args.timeout) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    chunk_times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    end = time.perf_counter()
    ttft = chunk_times[0] - start if chunk_times else None
    return {"error": None, "tokens": tokens, "latency_s": end - start, "ttft_s": ttft,
            "itl_s": [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)],
            "tpot_s": (end - start - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None}


async def run_once(url: str, prompts: list[str], concurrency: int, drafter: str | None,
                   args: argparse.Namespace) -> dict:
    """``args.requests`` requests, at most ``concurrency`` at a time; returns the run's record."""
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as http:
        label = drafter or "default"
        before = (await http.get("/metrics")).text
        gate = asyncio.Semaphore(concurrency)

        async def gated(i: int) -> dict:
            async with gate:
                return await one_request(http, prompts[i % len(prompts)], args, drafter)

        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(gated(i) for i in range(args.requests))),
                                         args.run_timeout)
        wall = time.perf_counter() - start
        after = (await http.get("/metrics")).text
        health = await wait_idle(http, args.timeout)
    steps = (metric_sum(after, "specdec_tokens_per_step_count", drafter)
             - metric_sum(before, "specdec_tokens_per_step_count", drafter))
    step_tokens = (metric_sum(after, "specdec_tokens_per_step_sum", drafter)
                   - metric_sum(before, "specdec_tokens_per_step_sum", drafter))
    nodes = (metric_sum(after, "specdec_tree_nodes_total", drafter)
             - metric_sum(before, "specdec_tree_nodes_total", drafter))
    ok = [r for r in results if r["error"] is None]
    ms = lambda values, q: None if percentile(values, q) is None else round(1000 * percentile(values, q), 2)  # noqa: E731
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    itl = [g for r in ok for g in r["itl_s"]]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "drafter": label, "requests": len(results),
            "errors": len(results) - len(ok), "error_messages": sorted({r["error"] for r in results if r["error"]}),
            "completion_tokens": tokens, "wall_s": round(wall, 3), "throughput_tok_s": round(tokens / wall, 2),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "itl_p50_ms": ms(itl, 50),
            "itl_p99_ms": ms(itl, 99), "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99),
            "tau": round(step_tokens / steps, 3) if steps else None,
            "tree_nodes_per_step": round(nodes / steps, 2) if steps else None,
            "leaked_blocks": health["kv_blocks_total"] - health["kv_blocks_free"]}


async def wait_idle(http: httpx.AsyncClient, timeout: float) -> dict:
    """``/health`` once no request is open (or after ``timeout`` s: then leaked blocks show in the record)."""
    deadline = time.monotonic() + timeout
    while True:
        health = (await http.get("/health")).json()
        if health.get("open_requests") == 0 or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """``specdec serve`` on a free loopback port, allowing every drafter of the run; waits for ``/health``."""
    port = free_port()
    extra = shlex.split(args.server_args)
    drafters = [d for d in args.drafter if d is not None]
    if drafters and "--drafter" not in extra:
        extra += ["--drafter", drafters[0], *(x for d in drafters[1:] for x in ("--allow-drafter", d))]
    cmd = [sys.executable, "-m", "specdec.app.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra]
    print("starting:", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise SystemExit(f"the server was not ready within {args.start_timeout:.0f} s")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM the server by its pid, wait (bounded), SIGKILL if it hangs; returns its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return proc.returncode


def table(runs: list[dict]) -> str:
    cols = ["concurrency", "drafter", "requests", "errors", "throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms",
            "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "tau", "tree_nodes_per_step", "leaked_blocks"]
    rows = [[str(r[c]) for c in cols] for r in runs]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(x.rjust(w) for x, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(cols), *(line(row) for row in rows)])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000 (loopback only)")
    p.add_argument("--start-server", action="store_true", help="start `specdec serve` on a free port, stop it after")
    p.add_argument("--server-args", default="", help="extra `specdec serve` flags, one quoted string")
    p.add_argument("--requests", type=int, default=32, help="requests per run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8], help="one run per value")
    p.add_argument("--drafter", nargs="+", default=[None], help="per-request drafter; one run per value")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--prompts", type=Path, default=None, help="prompt file (default: the built-in set)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the server to get ready")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    args = p.parse_args(argv)
    if (args.url is None) == (not args.start_server):
        p.error("give --url or --start-server (one of them)")
    if args.url is not None and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be a loopback address ({sorted(LOOPBACK)}), got {args.url}")
    if args.requests < 1 or min(args.concurrency) < 1 or args.max_tokens < 1:
        p.error("--requests, --concurrency and --max-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = load_prompts(args.prompts)
    proc, url = start_server(args) if args.start_server else (None, args.url.rstrip("/"))
    runs, status = [], None
    try:
        for concurrency in args.concurrency:
            for drafter in args.drafter:
                runs.append(asyncio.run(run_once(url, prompts, concurrency, drafter, args)))
                print(table(runs[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        if proc is not None:
            status = stop_server(proc)
    print(table(runs))
    report = {"url": url, "requests": args.requests, "max_tokens": args.max_tokens,
              "temperature": args.temperature, "server_exit_status": status, "runs": runs}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 1 if any(r["errors"] or r["leaked_blocks"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
