"""Flags shared by ``specdec`` commands and ``experiments/run.py``, and their validation before any model loads.

This module imports nothing heavy (no torch, no transformers) so that ``--help`` and argument errors are fast;
:func:`check_args` imports torch only to check ``--device``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")
TREE_SHAPES = ("chain", "dynamic", "static")
AUTO_MAX_BUDGET = 32  # --tree-budget auto: the drafter's tree before the chooser prunes it
HEAD_CHECKPOINTS = ("medusa", "eagle")  # drafters whose path= is a specdec checkpoint (specdec.checkpoint)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after every flag's help unless the help text already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_model_args(p: argparse.ArgumentParser, many_temperatures: bool = False) -> None:
    """Model, cache, sampling and drafter-shape flags shared by the commands (and experiments/run.py)."""
    p.add_argument("--model", default=None,
                   help=f"Hugging Face model id or local folder (default: the embedded {DEFAULT_MODEL})")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="weights and activations")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--attention", choices=["torch", "triton"], default=None,
                   help="attention backend (default: triton on CUDA, torch on CPU; env SPECDEC_ATTENTION)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="verify through torch.compile'd graphs over padded static shapes (1-64 tokens, 1-32 "
                        "sequences; CUDA graphs on CUDA); each new shape compiles once (about 30 s for an 8B model "
                        "on an H200, a minute for SmolLM2 on CPU); default: on for CUDA (1.09x HF static+compile "
                        "decoding on an H200, 0.24x eager), off on CPU (GEMM-bound: 0.95-0.98x eager)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=None,
                   help="run the target's float32 CPU linears by the kernel (F.linear, MKL packed, oneDNN) this "
                        "machine measured fastest per shape and row count, measured once and cached (env "
                        "SPECDEC_LINEAR_KERNEL forces one); default: on for float32 CPU models up to 4 GiB of linear "
                        "weights, unless --compile")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per request")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the model's chat template")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--num-blocks", type=int, default=512, help="KV cache blocks (capacity = blocks x block size)")
    if many_temperatures:
        p.add_argument("--temperature", type=float, nargs="+", default=None,
                       help="one run per temperature (0 = greedy, checked token by token against the baseline; "
                            "default: 0)")
    else:
        p.add_argument("--temperature", type=float, default=0.0,
                       help="0 = greedy (lossless: identical to the target)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: 0 in bench, random in generate)")
    p.add_argument("--acceptance", choices=["exact", "typical_lossy"], default="exact",
                   help="exact: output follows the target's distribution; typical_lossy: Medusa's rule (lossy)")
    p.add_argument("--draft-model", default=None,
                   help="draft model path or id for the draft-model drafter (default: none)")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="target layers the self drafter runs (default: the drafter's own, 6)")
    p.add_argument("--drafter-path", default=None,
                   help="trained medusa / eagle heads folder, or 'shipped' (default: untrained heads)")
    p.add_argument("--tree", choices=TREE_SHAPES, default=None, help="draft tree shape (default: the drafter's own)")
    p.add_argument("--tree-budget", type=tree_budget, default=None,
                   help="nodes per draft tree, root included, or 'auto': each step's size chosen with --cost-model "
                        f"(up to {AUTO_MAX_BUDGET} unless the spec sets budget=) (default: the drafter's own)")
    p.add_argument("--cost-model", default=None,
                   help="cost model of --tree-budget auto: 'auto' (default: this machine's step cost by tree size, "
                        "timed once per model in about 8 s and kept in the model cache) or a JSON from specdec "
                        "calibrate --out cost.json (adds contexts, prefill and drafter times)")
    p.add_argument("--tree-depth", type=int, default=None, help="draft depth (default: the drafter's own)")
    p.add_argument("--tree-topk", type=int, default=None,
                   help="children per expanded node of a dynamic tree (default: the drafter's own)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """Where prompts come from: a file (default: the built-in set) or a Hugging Face dataset."""
    p.add_argument("--prompts", default=None,
                   help="JSON list or JSONL file (prompt or Spec-Bench question_id/category/turns records; "
                        "default: the built-in set of 18 prompts)")
    p.add_argument("--dataset", default=None,
                   help="Hugging Face dataset id instead of --prompts, e.g. gsm8k (default: none)")
    p.add_argument("--dataset-config", default=None, help="dataset configuration name, e.g. main (default: none)")
    p.add_argument("--split", default="test", help="dataset split")
    p.add_argument("--field", default=None,
                   help="dataset text column (default: the first of question, prompt, instruction, text, problem)")
    p.add_argument("--limit", type=int, default=None,
                   help="K prompts (a dataset: a fixed sample of K rows; default: all)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the dataset sample")
    p.add_argument("--per-category", type=int, default=None, help="first K prompts of each category (default: all)")
    p.add_argument("--multi-turn", action="store_true",
                   help="run every turn, earlier answers in the context (default: first turn only)")


def tree_budget(text: str) -> int | str:
    """``--tree-budget``: an integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def auto_cost_model(args: argparse.Namespace) -> str | None:
    """With ``--tree-budget auto`` (drafters then run under the budget chooser) its cost model: ``--cost-model``'s
    path, or ``auto`` (this machine's measured step cost) when none is given; else None."""
    if getattr(args, "tree_budget", None) != "auto":
        return None
    return args.cost_model or "auto"


def spec_defaults(args: argparse.Namespace) -> dict:
    """Drafter-spec keys set by flags (``--tree``, ``--tree-budget``, ...); a spec string's own keys win. With
    ``--tree-budget auto`` the drafter is built with ``AUTO_MAX_BUDGET`` nodes and the chooser prunes each step."""
    budget = AUTO_MAX_BUDGET if args.tree_budget == "auto" else args.tree_budget
    return {"layers": args.draft_layers, "tree": args.tree, "depth": args.tree_depth, "budget": budget,
            "topk": args.tree_topk}


def spec_paths(args: argparse.Namespace) -> dict[str, str]:
    """Default ``path`` per drafter name from ``--draft-model`` / ``--drafter-path``."""
    paths = {"draft-model": args.draft_model, "medusa": args.drafter_path, "eagle": args.drafter_path}
    return {k: v for k, v in paths.items() if v is not None}


def _at_least(args: argparse.Namespace, limits: dict[str, int]) -> None:
    for dest, low in limits.items():
        value = getattr(args, dest, None)
        if isinstance(value, int) and value < low:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= {low}, got {value}")


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag and its limit for anything wrong before a model loads; resolves
    ``--device`` (``None`` = cuda if available, else cpu)."""
    _at_least(args, {"max_new_tokens": 1, "num_blocks": 1, "block_size": 1, "top_k": 0, "draft_layers": 1,
                     "tree_budget": 2, "tree_depth": 1, "tree_topk": 1, "limit": 1, "per_category": 1,
                     "batch_size": 1})
    temps = args.temperature if isinstance(args.temperature, list) else [args.temperature]
    for t in temps:
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {t}")
    if not (0 < args.top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    check_cost_model(getattr(args, "tree_budget", None), getattr(args, "cost_model", None))
    args.device = check_device(args.device)
    check_attention(args.attention, args.device)
    if getattr(args, "packed", None) and (args.device != "cpu" or args.dtype != "float32"):
        raise ValueError(f"--packed needs --dtype float32 on the CPU (got --dtype {args.dtype} on {args.device})")
    if getattr(args, "packed", None) and getattr(args, "compile", None):
        raise ValueError("--packed and --compile exclude each other (the compiled step packs nothing); pick one")


def check_cost_model(budget: int | str | None, path: str | None) -> None:
    """``--cost-model`` is used only with ``--tree-budget auto``; a path must be a readable cost-model JSON
    (checked without torch). ``auto`` or none: this machine's step cost, measured when first needed."""
    make = "make one: specdec calibrate --out cost.json, or pass --cost-model auto"
    if budget != "auto":
        if path is not None:
            raise ValueError("--cost-model is only used with --tree-budget auto")
        return
    if path is None or path == "auto":
        return
    try:
        raw = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--cost-model {path}: file not found ({make})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--cost-model {path}: not a readable JSON file ({err})") from None
    coef = raw.get("verify_coef") if isinstance(raw, dict) else None
    if not (isinstance(coef, list) and len(coef) == 4 and all(isinstance(c, int | float) for c in coef)):
        raise ValueError(f"--cost-model {path}: not a cost model (needs verify_coef: 4 numbers; {make})")


def check_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device here (this torch build or machine has none); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return name


def check_attention(name: str | None, device: str) -> None:
    name = name or os.environ.get("SPECDEC_ATTENTION")
    if name is not None and name not in ("torch", "triton"):
        raise ValueError(f"unknown attention backend {name!r} (SPECDEC_ATTENTION); choose torch or triton")
    on_cpu = not device.startswith("cuda")
    if name == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("--attention triton on CPU needs the Triton interpreter: use --attention torch, "
                         "or export TRITON_INTERPRET=1 (slow)")


def parse_spec(text: str, paths: dict[str, str], defaults: dict):
    """A drafter spec ``NAME[:key=value,...]`` with ``--drafter-path``-style default paths and flag defaults
    (raises ``ValueError`` naming a bad option, or a bad head checkpoint); imports the drafter registry."""
    from specdec.checkpoint import check_checkpoint
    from specdec.drafters import DrafterSpec

    spec = DrafterSpec.parse(text, path=paths.get(text.partition(":")[0]), **defaults)
    if spec.name in HEAD_CHECKPOINTS and spec.path not in (None, "shipped"):
        check_checkpoint(Path(spec.path).expanduser(), kind=spec.name)  # before any model loads
    store = spec.options.get("store")
    if spec.name == "ngram" and store not in (None, "shipped"):
        from specdec.drafters.store import check_store

        try:
            check_store(Path(store).expanduser())
        except ValueError as err:
            raise ValueError(f"ngram:store={store}: {err}") from None
    return spec
