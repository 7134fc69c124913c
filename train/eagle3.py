"""EAGLE-3 head trainer: token prediction from fused target features, training-time test, draft vocabulary.

Data: a ``features`` folder (:mod:`specdec.train.features`): per response token ``i`` the fused low/mid/high target
features ``F_i`` ``[3 H]`` at the position predicting ``r[i]``, and the target's top-k logits there. Pair ``i`` is
``(fc(F_i), r[i])`` at RoPE position ``P - 1 + i`` (as :class:`~specdec.drafters.eagle3.Eagle3Drafter` forms it);
the head's output ``o_i`` should predict what the TARGET says after ``r[i]``: the soft label is the softmax of the
target's top-k logits at row ``i + 1``, restricted to the draft vocabulary and renormalised, and a pair counts only
where the target's argmax lies in the draft vocabulary (EAGLE-3's ``t2d`` mask). No feature regression.

**Training-time test** (``steps = S``): pass 1 reads the real features; pass ``s`` reads pass ``s - 1``'s output at
``i - 1`` (the head's own output fed back, gradients kept, as in EAGLE-3) with the real token ``r[i]``, and its query
``i`` attends to pass-1 keys ``j <= i - s + 1`` (real history up to the root) and to pass-``k`` key ``i - s + k``
(``k = 2..s``: its draft ancestors and itself), i.e. exactly a depth-``s - 1`` draft node
(:func:`specdec.train.eagle.unroll_mask`). Pass ``s`` scores pairs ``i >= s - 1``; the loss is EAGLE-3's
``sum_s 0.8^(s-1) CE_s`` normalised by ``sum_s 0.8^(s-1)``.

Checkpoints (``step_N``) and the fp16 export are in EAGLE-3's published layout (``config.json``,
``model.safetensors`` with ``d2t``/``t2d``), loadable by ``eagle3:path=DIR`` and ``published:path=DIR``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from specdec.draft_vocab import draft_index, frequent_tokens
from specdec.drafters.eagle3 import Eagle3Drafter, Eagle3Head, fused_layers, load_eagle3_head
from specdec.target import TargetModel, eos_token_ids
from specdec.train.data import load_distillation_data
from specdec.train.eagle import UNROLL_ATTENTION, UnrollKV
from specdec.train.evaluation import EvalConfig, eval_prompt_ids
from specdec.train.loop import LoopConfig, Trainee, batch_indices, split_rows, train_loop

STEP_DECAY = 0.8  # EAGLE-3's weight of training-time-test step s: 0.8 ** (s - 1)


EVAL = EvalConfig(tree="dynamic", depth=5, budget=8, topk=4, holdout=4)  # the verifier evaluation by default


@dataclass(frozen=True)
class Eagle3TrainConfig:
    """Settings of an EAGLE-3 training run.

    Attributes:
        data_dir: ``features`` folder(s).
        loop: optimizer, evaluation, checkpoint and tracking settings.
        draft_vocab_size: the head scores the ``N`` most frequent response tokens (plus EOS); 0 = all.
        steps_ttt: training-time-test passes (1 = teacher forcing only).
        batch_size / seq_len: examples per optimizer step, at most ``seq_len`` pairs per example.
        evaluation: the verifier evaluation (:class:`EvalConfig`; default :data:`EVAL`).
        vocab_data: data folders (token ids suffice) whose responses pick the draft vocabulary (default: the
            training data at the start).
        follow: every ``follow`` steps, re-read ``data_dir`` and train on the shards a still-running ``features`` job
            wrote since (0 = the data at the start only). With it, ``--resume`` no longer repeats the same batches.
        init: start from this checkpoint's weights and draft vocabulary (read by :func:`load_eagle3_head`;
            fine-tuning, e.g. the shipped head on new data; ``draft_vocab_size`` and ``vocab_data`` are then unused)
            instead of a fresh head.
    """

    data_dir: str | tuple[str, ...]
    loop: LoopConfig
    draft_vocab_size: int = 8192
    steps_ttt: int = 4
    batch_size: int = 8
    seq_len: int = 256
    evaluation: EvalConfig = EVAL
    vocab_data: tuple[str, ...] = ()
    follow: int = 0
    init: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps_ttt", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.draft_vocab_size < 0:
            raise ValueError("draft_vocab_size must be >= 0")


@dataclass(frozen=True)
class FusedBatch:
    """Padded pairs of one step: ``fused [B, T, 3H]``, ``tokens``/``positions [B, T]`` int64, soft labels
    ``label_ids``/``label_probs [B, T, k]`` (draft indices, -1 = outside the draft vocabulary; probabilities),
    ``top1 [B, T]`` draft index of the target's argmax (-1 outside) and ``lengths [B]``."""

    fused: torch.Tensor
    tokens: torch.Tensor
    positions: torch.Tensor
    label_ids: torch.Tensor
    label_probs: torch.Tensor
    top1: torch.Tensor
    lengths: torch.Tensor


def fused_batch(rows: Sequence[dict], seq_len: int, vocab_ids: torch.Tensor | None, vocab: int,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> FusedBatch:
    """The pairs of ``rows`` (features-folder rows); pair ``i`` is labelled by the target's top-k at row ``i+1``.
    ``fused`` comes in ``dtype`` (stored float16 is upcast)."""
    n = [max(0, min(len(r["response_ids"]), seq_len + 1) - 1) for r in rows]
    width, size, k = max(1, max(n)), rows[0]["fused"].shape[1], rows[0]["topk_indices"].shape[1]
    fused = torch.zeros(len(rows), width, size, dtype=dtype)
    tokens, positions = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    ids, logits = torch.zeros(len(rows), width, k, dtype=torch.long), torch.full((len(rows), width, k), -1e4)
    for b, (row, m) in enumerate(zip(rows, n, strict=True)):
        fused[b, :m] = torch.as_tensor(np.asarray(row["fused"][:m])).to(dtype)
        tokens[b, :m] = torch.as_tensor(np.asarray(row["response_ids"][:m], dtype=np.int64))
        positions[b] = len(row["prompt_ids"]) - 1 + torch.arange(width)
        ids[b, :m] = torch.as_tensor(np.asarray(row["topk_indices"][1: m + 1], dtype=np.int64))
        logits[b, :m] = torch.as_tensor(np.asarray(row["topk_values"][1: m + 1], dtype=np.float32))
    draft = ids if vocab_ids is None else draft_index(ids, vocab_ids, vocab)
    probs = logits.masked_fill(draft < 0, float("-inf")).softmax(-1).nan_to_num(0.0)
    lengths = torch.tensor(n, dtype=torch.long)
    return FusedBatch(*(t.to(device) for t in (fused, tokens, positions, draft, probs, draft[..., 0], lengths)))


def ttt_passes(head: Eagle3Head, batch: FusedBatch, steps: int) -> Iterator[torch.Tensor]:
    """The outputs ``[B, T, H]`` of training-time-test passes ``1 .. steps`` (module docstring); each pass is
    computed when the caller asks for it."""
    state = UnrollKV(batch.lengths)
    inputs = head.fc(batch.fused.to(head.fc.weight.dtype))
    for _ in range(steps):
        out = head.forward_with(inputs, batch.tokens, batch.positions, UNROLL_ATTENTION, eagle_unroll=state)
        yield out
        inputs = torch.cat([out[:, :1] * 0, out[:, :-1]], dim=1)  # the next pass reads out[i - 1]


def eagle3_loss(head: Eagle3Head, batch: FusedBatch, steps: int) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE-3's decayed sum over ``steps`` training-time-test passes of the soft cross-entropy (module
    docstring); per-pass metrics ``train/loss_step{s}`` and ``train/acc_step{s}`` (argmax = the target's)."""
    width = batch.tokens.shape[1]
    idx = torch.arange(width, device=batch.tokens.device)
    valid = (idx[None] < batch.lengths[:, None]) & (batch.top1 >= 0)
    total, norm, metrics = batch.fused.new_zeros((), dtype=torch.float32), 0.0, {}
    for s, out in enumerate(ttt_passes(head, batch, steps), start=1):
        scored = valid & (idx[None] >= s - 1)
        if not bool(scored.any()):
            break
        logp = head.logits(out[scored]).float().log_softmax(-1)  # [M, N]
        ids, probs = batch.label_ids[scored], batch.label_probs[scored]
        ce = -(probs * logp.gather(-1, ids.clamp(min=0))).sum(-1).mean()
        weight = STEP_DECAY ** (s - 1)
        total, norm = total + weight * ce, norm + weight
        metrics[f"train/loss_step{s}"] = ce.item()
        metrics[f"train/acc_step{s}"] = (logp.argmax(-1) == batch.top1[scored]).float().mean().item()
    if not norm:  # no pair of this batch has a target argmax in the draft vocabulary: a zero step
        total = head.fc.weight.sum() * 0.0
    total = total / max(norm, 1e-9)
    metrics["train/loss"] = total.item()
    return total, metrics


def load_trained_state(head: Eagle3Head, path: Path) -> None:
    """Resume: the weights of a checkpoint written by :meth:`Eagle3Head.save_pretrained` (draft vocabulary checked)."""
    state = load_file(str(Path(path) / "model.safetensors"))
    d2t, _ = state.pop("d2t"), state.pop("t2d")
    ids = torch.arange(d2t.numel()) + d2t
    mine = torch.arange(head.config.vocab_size) if head.vocab_ids is None else head.vocab_ids.cpu()
    if not torch.equal(ids, mine):
        raise ValueError(f"checkpoint {path} has another draft vocabulary ({ids.numel()} tokens) than this run "
                         f"({mine.numel()})")
    head.load_state_dict({k: v.to(head.fc.weight.dtype) for k, v in state.items()}, strict=True)


def export_eagle3(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Copy an EAGLE-3 checkpoint with its weights cast to ``dtype`` (``d2t``/``t2d`` unchanged;
    :func:`specdec.checkpoint.export_checkpoint`, what ``python -m specdec.train export`` runs)."""
    from specdec.checkpoint import export_checkpoint

    return export_checkpoint(src, dst, dtype)


def train_eagle3(target_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: Eagle3TrainConfig
                 ) -> Path:
    """Train an EAGLE-3 head on ``config.data_dir``; returns the final checkpoint folder ``out_dir/step_{steps}``."""
    torch.manual_seed(config.loop.seed)
    target_model.eval().requires_grad_(False)
    data = _load_features(config.data_dir)
    train_ids, held_ids = split_rows(range(len(data)), config.evaluation.holdout, config.data_dir)
    target = TargetModel(target_model)
    vocab, eos_ids = target.vocab_size, eos_token_ids(target_model, tokenizer)
    if config.init:  # the checkpoint's weights and draft vocabulary, read and checked as the drafter reads them
        head = load_eagle3_head(config.init, target).float()
        vocab_ids = None if head.vocab_ids is None else head.vocab_ids.cpu()
    else:
        vocab_ids = None
        if config.draft_vocab_size:
            source = load_distillation_data(config.vocab_data) if config.vocab_data else data
            responses = source.select_columns(["response_ids"])
            picks = range(len(source)) if config.vocab_data else train_ids
            vocab_ids = frequent_tokens((responses[i]["response_ids"] for i in picks), config.draft_vocab_size,
                                        vocab, eos_ids)
        head = Eagle3Head.untrained(target, vocab_ids).float()
    fused_layers(target.num_layers)  # the target must have three distinct fused layers
    seen = {"data": data, "train": train_ids}
    counters = {"pairs_seen": 0}  # saved with each checkpoint: a resumed run counts on from there

    def loss(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if config.follow and step % config.follow == 0:  # shards written since by a features job still running
            grown = _load_features(config.data_dir)
            held = set(held_ids)
            seen.update(data=grown, train=[i for i in range(len(grown)) if i not in held])
        train = seen["train"]
        picks = batch_indices(step, config.batch_size, len(train), config.loop.seed)
        rows = [seen["data"][train[i]] for i in picks]
        batch = fused_batch(rows, config.seq_len, vocab_ids, vocab, target.device)
        total, metrics = eagle3_loss(head, batch, config.steps_ttt)
        counters["pairs_seen"] += int(batch.lengths.sum())
        metrics.update({"train/examples_available": len(train), "train/pairs_seen": counters["pairs_seen"]})
        return total, metrics

    def drafter(module: Eagle3Head) -> Eagle3Drafter:
        ev = config.evaluation
        d = Eagle3Drafter(module, tree=ev.tree, depth=ev.depth, budget=ev.budget, topk=ev.topk, backend=target.backend)
        d.feature_layers = fused_layers(target.num_layers)
        return d

    held = [data[i] for i in held_ids]
    prompts = eval_prompt_ids(tokenizer, config.evaluation.prompts, held)
    run_config = {**asdict(config), "draft_vocab": 0 if vocab_ids is None else vocab_ids.numel(),
                  "train_examples": len(train_ids)}
    trainee = Trainee(head, loss, drafter, load_trained_state, counters)
    return train_loop(trainee, target_model, prompts, eos_ids, config.loop, run_config)


def _load_features(folders):
    data = load_distillation_data(folders).with_format("numpy", dtype=None)
    if "fused" not in data.column_names:
        raise ValueError(f"{folders} holds no fused features: run `python -m specdec.train features` on it")
    return data


def add_eagle3_parser(sub: argparse._SubParsersAction) -> None:
    from specdec.train.__main__ import add_loop_args

    p = sub.add_parser("eagle3", help="train an EAGLE-3 head on a 'features' folder (fused target features)")
    add_loop_args(p, lr=1e-3)
    p.set_defaults(draft_vocab=8192)
    p.add_argument("--ttt", type=int, default=4, help="training-time-test passes (1 = teacher forcing only)")
    p.add_argument("--eval-prompts", default=None,
                   help="JSONL prompt file added to the tau evaluation (default: held-out rows only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--vocab-data", action="append", default=None,
                   help="data folder(s) whose responses pick the draft vocabulary (default: the training data)")
    p.add_argument("--init", default=None,
                   help="start from this EAGLE-3 checkpoint folder (weights and draft vocabulary), e.g. "
                        "specdec/weights/smollm2-135m-instruct/eagle3 to fine-tune the shipped head "
                        "(default: a new head)")
    p.add_argument("--follow", type=int, default=0,
                   help="re-read --data every N steps, training on shards written since (default: 0 = off)")


def cmd_eagle3(args: argparse.Namespace) -> None:
    from specdec.app.args import check_device
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import load_prompts
    from specdec.train.__main__ import loop_config

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = tuple(p.text for p in load_prompts(args.eval_prompts)) if args.eval_prompts else ()
    config = Eagle3TrainConfig(
        data_dir=tuple(args.data), loop=loop_config(args, "specdec-eagle3"), draft_vocab_size=args.draft_vocab,
        steps_ttt=args.ttt, batch_size=args.batch_size, seq_len=args.seq_len,
        evaluation=replace(EVAL, prompts=prompts, holdout=args.eval_holdout), vocab_data=tuple(args.vocab_data or ()),
        follow=args.follow, init=args.init,
    )
    model, tokenizer = load_model_and_tokenizer(args.model, device=check_device(args.device))
    print(f"trained EAGLE-3 head: {train_eagle3(model, tokenizer, config)}")
