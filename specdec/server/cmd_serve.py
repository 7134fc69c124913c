"""``specdec serve``: load the model and drafters, then serve the OpenAI-compatible API until SIGINT/SIGTERM.

Shutdown: the first SIGINT/SIGTERM ends every open request at once (streams get an error event and ``[DONE]``,
waiting requests a 503), uvicorn stops accepting connections and waits for the open ones (at most
``timeout_graceful_shutdown`` seconds), then the engine thread is joined. A second SIGINT forces the exit.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from specdec.app.args import add_model_args, auto_cost_model, check_args, parse_spec, spec_defaults, spec_paths

HELP = "serve an OpenAI-compatible HTTP API (chat and completions, streaming, /metrics) on the step engine"
# n-gram: no model pass, so it stays cheap when many requests share a step (the hybrid, fastest at batch 1 in
# docs/results/final/final_b1.json, runs the EAGLE head for the batch; unmeasured under server load)
DEFAULT_DRAFTER = "ngram"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", default=DEFAULT_DRAFTER,
                   help="drafter for requests that name none (NAME[:key=value,...], as in generate)")
    p.add_argument("--allow-drafter", action="append", default=[], metavar="SPEC",
                   help="another drafter requests may choose with {\"specdec\": {\"drafter\": SPEC}} (repeatable; "
                        "'none' is always allowed; default: none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0 = any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together per step")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait beyond the running batch; more get HTTP 429")
    p.add_argument("--max-step-tokens", type=int, default=512, help="token budget of one forward (trees + prefill)")
    p.add_argument("--max-tree-nodes", type=int, default=64, help="largest draft tree a step verifies")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: compile every step bucket before serving, not on the first requests "
                        "(default: on)")
    p.add_argument("--served-model-name", default=None,
                   help="model id in the API (default: --model, or SmolLM2-135M-Instruct)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level")
    add_model_args(p)
    p.set_defaults(chat=True)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (``ValueError`` naming the address if it cannot be had)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def warm_up(engine) -> None:
    """Compile the verify step for every bucket the server's steps can use (up to ``max_batch`` sequences and
    ``max_step_tokens`` tokens), with the hidden states its drafters read, before the first request."""
    t0 = time.perf_counter()
    done = engine.warmup(log=lambda msg: print(f"specdec: {msg}", file=sys.stderr, flush=True))
    print(f"specdec: {len(done)} compiled step buckets ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-waiting", args.max_waiting, 0),
                             ("--max-tree-nodes", args.max_tree_nodes, 1), ("--port", args.port, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535, got {args.port}")
    names = list(dict.fromkeys([args.drafter, *args.allow_drafter, "none"]))
    specs = {name: parse_spec(name, spec_paths(args), spec_defaults(args)) for name in names}
    sock = listen(args.host, args.port)  # before the model loads: a busy port fails at once

    import uvicorn

    from specdec.app.loaders import DEFAULT_MODEL, load_target
    from specdec.drafters import build_drafter
    from specdec.server.lifecycle import GracefulServer
    from specdec.server.openai_api import create_app
    from specdec.server.settings import ServerSettings, build_state

    target, tokenizer = load_target(args)
    drafters = {name: build_drafter(spec, target) for name, spec in specs.items()}
    if auto_cost_model(args) is not None:  # --tree-budget auto: every drafter under the budget chooser
        from specdec.research.auto_budget import wrap_auto_budget

        drafters = {name: wrap_auto_budget(d, auto_cost_model(args), name, args.max_tree_nodes, target)
                    for name, d in drafters.items()}
    settings = ServerSettings(
        model_name=args.served_model_name or args.model or DEFAULT_MODEL, default_drafter=args.drafter,
        num_blocks=args.num_blocks, block_size=args.block_size, max_batch=args.max_batch,
        max_waiting=args.max_waiting, max_tree_nodes=args.max_tree_nodes, max_step_tokens=args.max_step_tokens,
        default_max_tokens=args.max_new_tokens, default_temperature=args.temperature, default_top_p=args.top_p,
        default_top_k=args.top_k, acceptance=args.acceptance,
    )
    state = build_state(target, tokenizer, drafters, settings)
    if target.compiled is not None and args.warmup:
        warm_up(state.loop.engine)
    config = uvicorn.Config(create_app(state), log_level=args.log_level, timeout_graceful_shutdown=5)
    server = GracefulServer(config, on_exit=state.loop.stop_soon)
    host, port = sock.getsockname()[:2]
    print(f"specdec: serving {settings.model_name} on http://{host}:{port}/v1 (drafters {names}, default "
          f"{args.drafter}; Ctrl-C stops)", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
