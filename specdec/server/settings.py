"""Server settings and the assembly of one server from a loaded target: cache, drafters, engine loop, limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from specdec.interfaces import Drafter
from specdec.server.engine_loop import EngineLoop
from specdec.server.metrics import ServerMetrics
from specdec.server.openai_api import ServerState
from specdec.server.protocol import Limits
from specdec.target import TargetModel, eos_token_ids


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``specdec serve`` is started with, after the model and drafters are loaded.

    ``default_drafter`` serves requests that name none; ``max_waiting`` bounds the queue beyond the ``max_batch``
    running requests (429 beyond); ``default_max_tokens`` applies when a request omits ``max_tokens``;
    ``default_temperature/top_p/top_k`` when it omits those."""

    model_name: str
    default_drafter: str
    num_blocks: int = 512
    block_size: int = 16
    max_batch: int = 8
    max_waiting: int = 64
    max_tree_nodes: int = 64
    max_step_tokens: int = 512
    default_max_tokens: int = 256
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    acceptance: str = "exact"
    shutdown_timeout_s: float = 10.0


def build_state(target: TargetModel, tokenizer: PreTrainedTokenizerBase, drafters: Mapping[str, Drafter | None],
                settings: ServerSettings, eos: Sequence[int] | None = None) -> ServerState:
    """One engine loop (not started: the app's lifespan starts it) over a new cache of ``settings.num_blocks``."""
    if settings.default_drafter not in drafters:
        raise ValueError(f"default drafter {settings.default_drafter!r} is not among {sorted(drafters)}")
    metrics = ServerMetrics()
    loop = EngineLoop(
        target, target.new_cache(settings.num_blocks, settings.block_size), drafters,
        eos_token_ids(target.model, tokenizer) if eos is None else eos, metrics, settings.max_waiting,
        max_batch=settings.max_batch, max_tree_nodes=settings.max_tree_nodes,
        max_step_tokens=settings.max_step_tokens, acceptance=settings.acceptance,
    )
    limits = Limits(settings.model_name, tuple(drafters), settings.default_drafter, settings.default_max_tokens,
                    target.vocab_size, loop.check_fits, loop.room, settings.default_temperature,
                    settings.default_top_p, settings.default_top_k)
    return ServerState(loop, tokenizer, limits, metrics, settings.shutdown_timeout_s)
