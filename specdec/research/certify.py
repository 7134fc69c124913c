"""Losslessness certificate: is every token a speculative run emitted distributed as the target says it should be?

After generating, one teacher-forced forward of the unmodified target over prompt + output gives the target's
processed distribution ``p_t`` at every position (:func:`specdec.sampling.process_logits` with the run's settings).
Two families of randomized PITs (:mod:`specdec.research.pit`), each exactly i.i.d. U(0, 1) under an exact sampler:

* **marginal** (the certificate): every emitted token under ``p_t``. Split by drafter and by step depth (the token's
  position in its verification step, fixed by the past, so the split keeps uniformity).
* **conditional** (where the exactness comes from): given the verified tree, every tried child's accept/reject
  decision as a Bernoulli(``min(1, p(x) / q(x))``) under the residual ``p`` its earlier siblings left (``decision,
  depth=d``); a ``resampled`` token (the bonus after every child was rejected) under the final residual; a
  ``bonus`` token (after a leaf) and the ``first`` token (from the prefill) under ``p_t``. Splitting the MARGINAL PIT
  by accepted vs resampled would not be uniform even for an exact sampler (acceptance depends on the token), so the
  accepted/resampled split is made here, where it is valid.

Verdict (``passed``): no impossible event (a token of probability 0, a rejected child of acceptance probability 1
or an accepted one of 0) and KS and AD p-values >= ``alpha`` for the pooled marginal and the pooled conditional
PITs. Group p-values are diagnostics (expect a few small ones among many groups; a Bonferroni minimum is reported).
Power: see :mod:`specdec.research.pit` (20,000 tokens detect a CDF deviation of 0.014 at p < 0.001).

Provenance comes from :class:`ProvenanceDrafter`, a protocol-level wrapper (no engine hook): it keeps the draft
each ``propose`` returned and labels the tokens of the next ``accept``. Memory: a sampled draft's ``q`` rows (``V``
floats per tried child) are kept until the request's PITs are computed, as it finishes. Known limit: with duplicate
sibling tokens (drafts sampled with replacement) a decision is attributed to the first sibling carrying the token.

    python -m specdec.research.certify --drafter none ngram "medusa:path=shipped" --temperature 1.0 --limit 18 \\
        --repeats 4 --max-new-tokens 128 --out cert.json --plot cert.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from specdec.engine import SpeculativeEngine
from specdec.interfaces import Draft, Drafter, DraftInput
from specdec.research.pit import bernoulli_pit, token_pit, uniformity
from specdec.sampling import SamplingParams, process_logits
from specdec.target import TargetModel
from specdec.tree import TokenTree


class RootOnlyDrafter:
    """Proposes the root alone: plain sampling from the target, through the drafter protocol."""

    vocab_size = None
    needs_hidden = False

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        return [Draft(TokenTree.chain(item.history[-1:])) for item in batch]

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass


@dataclass
class TokenRecord:
    """How one emitted token came about: ``kind`` (``first``, ``accepted``, ``resampled``, ``bonus``), its step
    depth, and the children tried at its position before it was emitted: ``(token, q row [V] or None = one-hot)``."""

    kind: str
    depth: int
    tried: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    without_replacement: bool = False


class ProvenanceDrafter:
    """Wraps a drafter and records every emitted token's :class:`TokenRecord`, filed under the request's history
    buffer (``records[history.data_ptr()]``), which identifies a running request even across preemptions."""

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.needs_hidden = inner.needs_hidden
        self._pending: dict[int, tuple[int, Draft]] = {}
        self.records: dict[int, list[TokenRecord]] = defaultdict(list)

    def propose(self, batch: Sequence[DraftInput]) -> list[Draft]:
        drafts = self.inner.propose(batch)
        for item, draft in zip(batch, drafts, strict=True):
            self._pending[item.seq_id] = (item.history.data_ptr(), draft)
        return drafts

    def accept(self, seq_id: int, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        pending = self._pending.pop(seq_id, None)
        if pending is not None:  # None: the prefill's token (or a re-prefill after preemption)
            ptr, draft = pending
            self.records[ptr] += step_records(draft, tokens.tolist())
        self.inner.accept(seq_id, tokens, hidden)

    def release(self, seq_id: int) -> None:
        self._pending.pop(seq_id, None)
        self.inner.release(seq_id)


def step_records(draft: Draft, tokens: list[int]) -> list[TokenRecord]:
    """Records of one step's ``tokens`` (accepted draft tokens, then the bonus) against the verified draft."""
    tree = draft.tree
    kids, tree_tokens = tree.children(), tree.tokens.tolist()

    def row(c: int) -> torch.Tensor | None:
        return None if draft.probs is None else draft.probs[c].detach().double().cpu()

    out, node = [], 0
    for d, tok in enumerate(tokens):
        last = d == len(tokens) - 1
        chosen = None if last else next(c for c in kids[node] if tree_tokens[c] == tok)
        tried = kids[node] if chosen is None else kids[node][: kids[node].index(chosen) + 1]
        kind = "accepted" if chosen is not None else "resampled" if kids[node] else "bonus"
        out.append(TokenRecord(kind, d + 1, [(tree_tokens[c], row(c)) for c in tried], draft.without_replacement))
        node = chosen if chosen is not None else node
    return out


@dataclass
class Certificate:
    """PIT values of a certificate run; :meth:`report` tests them. ``marginal``/``conditional``: ``(u, drafter,
    group)``; ``impossible``: events of probability 0 under the target (each one fails the certificate)."""

    marginal: list[tuple[float, str, str]] = field(default_factory=list)
    conditional: list[tuple[float, str, str]] = field(default_factory=list)
    impossible: int = 0
    settings: dict = field(default_factory=dict)

    def report(self, alpha: float = 0.01) -> dict:
        """p-values pooled and per group, and the verdict ``passed`` (see the module docstring)."""
        groups: dict[str, list[float]] = defaultdict(list)
        for family, values in (("marginal", self.marginal), ("conditional", self.conditional)):
            for u, drafter, group in values:
                groups[f"{family}:{group}"].append(u)
                groups[f"{family}:drafter={drafter},{group}"].append(u)
                groups[f"{family}:drafter={drafter}"].append(u)
        by_group = {k: uniformity(v) for k, v in sorted(groups.items()) if len(v) >= 20}
        marginal = uniformity([u for u, _, _ in self.marginal])
        conditional = uniformity([u for u, _, _ in self.conditional])
        min_p = min((g["ks_p"] for g in by_group.values()), default=1.0)
        ok = all(r["ks_p"] >= alpha and r["ad_p"] >= alpha for r in (marginal, conditional))
        return {"settings": self.settings, "alpha": alpha, "n_tokens": len(self.marginal),
                "impossible_events": self.impossible, "overall": marginal, "conditional": conditional,
                "groups": by_group, "groups_min_ks_p_bonferroni": min(1.0, min_p * max(len(by_group), 1)),
                "passed": self.impossible == 0 and ok}

    def plot(self, path: str, bins: int = 20) -> None:
        """PIT histograms against the uniform density: marginal, conditional, and each conditional kind."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = {"marginal (all tokens)": [u for u, _, _ in self.marginal],
                  "conditional (pooled)": [u for u, _, _ in self.conditional]}
        for kind in ("decision", "resampled", "bonus", "first"):
            panels[kind] = [u for u, _, g in self.conditional if g.split(",")[0] == kind]
        panels = {k: v for k, v in panels.items() if v}
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.9), squeeze=False)
        for ax, (title, u) in zip(axes[0], panels.items(), strict=True):
            ax.hist(u, bins=bins, range=(0, 1), density=True, color="#4c72b0")
            ax.axhline(1.0, color="k", lw=1, ls="--")
            res = uniformity(u)
            ax.set_title(f"{title}\nn={len(u)} KS p={res['ks_p']:.3g} AD p={res['ad_p']:.3g}", fontsize=8)
            ax.set_xlabel("PIT")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


@torch.inference_mode()
def add_request_pits(cert: Certificate, target: TargetModel, drafter: str, prompt: torch.Tensor,
                     output: Sequence[int], records: Sequence[TokenRecord], params: SamplingParams,
                     gen: torch.Generator) -> None:
    """PIT one finished request: ``output`` (``R`` tokens) after ``prompt [P]``, ``records`` one per token, from ONE
    teacher-forced forward under ``params``."""
    out = torch.as_tensor(list(output), dtype=torch.long)
    ids = torch.cat([prompt.cpu(), out])[None, :-1].to(target.device)
    probs = process_logits(target.model(ids).logits[0, prompt.numel() - 1 :].double(), params).cpu()  # [R, V]
    u, px = token_pit(probs, out, torch.rand(out.numel(), generator=gen, dtype=torch.float64))
    cert.impossible += int((px <= 0).sum())
    cert.marginal += [(float(x), drafter, f"depth={r.depth}") for x, r in zip(u, records, strict=True)]
    for t, rec in enumerate(records):
        p, drawn = probs[t], torch.zeros(probs.shape[-1], dtype=torch.bool)
        for i, (x, q) in enumerate(rec.tried):
            if q is None:
                q = torch.zeros_like(p)
                q[x] = 1.0
            elif rec.without_replacement and bool(drawn.any()):
                q = q.masked_fill(drawn, 0.0)
                q = q / q.sum()
            a = min(1.0, float(p[x] / q[x])) if float(q[x]) > 0 else 0.0
            accepted = rec.kind == "accepted" and i == len(rec.tried) - 1
            cert.impossible += int((accepted and a == 0.0) or (not accepted and a == 1.0))
            v = float(torch.rand((), generator=gen, dtype=torch.float64))
            cert.conditional.append((bernoulli_pit(a, accepted, v), drafter, f"decision,depth={rec.depth}"))
            residual = (p - q).clamp(min=0.0)
            p = residual / residual.sum() if float(residual.sum()) > 0 else p
            drawn[x] = True
        if rec.kind != "accepted":  # the token was drawn from p (the residual after any rejections)
            cu, _ = token_pit(p[None], out[t : t + 1], torch.rand(1, generator=gen, dtype=torch.float64))
            cert.conditional.append((float(cu[0]), drafter, rec.kind))


def run_certificate(target: TargetModel, drafters: dict[str, Drafter | None], prompts: Sequence[torch.Tensor],
                    sampling: SamplingParams, max_new_tokens: int, repeats: int = 1, eos_token_ids: Sequence[int] = (),
                    acceptance: str = "exact", certify_params: SamplingParams | None = None, max_batch: int = 32,
                    max_tree_nodes: int = 64, seed: int = 0) -> Certificate:
    """Generate ``repeats`` samples per prompt with every drafter (request ``k`` seeded ``sampling.seed + k``; a
    drafter's requests batched through one engine) and PIT every request as it finishes.

    ``certify_params`` (default: ``sampling``) is the distribution tested against: a different one makes a
    deliberately biased run (the tests use it). A ``None`` drafter samples from the target alone.
    """
    if sampling.greedy:
        raise ValueError("the certificate tests sampled outputs: need temperature > 0 (at 0 greedy equality applies)")
    against = certify_params or sampling
    gen = torch.Generator().manual_seed(seed)
    cert = Certificate(settings={"temperature": sampling.temperature, "top_k": sampling.top_k,
                                 "top_p": sampling.top_p, "acceptance": acceptance, "repeats": repeats,
                                 "max_new_tokens": max_new_tokens, "n_prompts": len(prompts),
                                 "certified_against": {"temperature": against.temperature, "top_k": against.top_k,
                                                       "top_p": against.top_p}})
    jobs = [p for p in prompts for _ in range(repeats)]
    longest = max(p.numel() for p in prompts) + max_new_tokens + max_tree_nodes
    blocks = min(len(jobs), max_batch) * -(-longest // 16) + 1
    for name, inner in drafters.items():
        drafter = ProvenanceDrafter(inner if inner is not None else RootOnlyDrafter())
        engine = SpeculativeEngine(target, target.new_cache(blocks, 16), drafter, eos_token_ids, max_tree_nodes,
                                   acceptance, max_batch=max_batch)
        reqs = {}
        for i, prompt in enumerate(jobs):
            rid = engine.add_request(prompt, replace(sampling, max_new_tokens=max_new_tokens,
                                                     seed=(sampling.seed or 0) + i))
            reqs[rid] = (engine.request(rid), prompt)
        while engine.has_work():
            for out in engine.step():
                if not out.finished:
                    continue
                req, prompt = reqs.pop(out.request_id)
                if req.stop_reason == "error":
                    raise RuntimeError(f"drafter {name!r}: a request failed: {req.error}") from req.exception
                records = [TokenRecord("first", 0), *drafter.records.pop(req.history.data_ptr(), [])]
                add_request_pits(cert, target, name, prompt, req.output, records[: len(req.output)], against, gen)
    return cert


def main(argv: Sequence[str] | None = None) -> int:
    from specdec.app.cmd_certify import HELP, add_arguments

    parser = argparse.ArgumentParser(prog="python -m specdec.research.certify", description=HELP)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Generate, PIT and test (arguments: :func:`specdec.app.cmd_certify.add_arguments`); exit status 1 if it fails."""
    from specdec.app.loaders import load_model_and_tokenizer
    from specdec.app.prompts import builtin_prompts_path, encode_prompt, load_prompts
    from specdec.drafters import DrafterSpec, build_drafter
    from specdec.target import eos_token_ids

    model, tok = load_model_and_tokenizer(args.model, torch.float32)
    target = TargetModel(model)
    prompts = [encode_prompt(tok, p.text) for p in load_prompts(args.prompts or builtin_prompts_path(), args.limit)]
    drafters = {d: build_drafter(DrafterSpec.parse(d), target) for d in args.drafter}
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, seed=args.seed)
    cert = run_certificate(target, drafters, prompts, sampling, args.max_new_tokens, args.repeats,
                           eos_token_ids(model, tok), args.acceptance, max_batch=args.max_batch, seed=args.seed)
    report = cert.report(args.alpha)
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.plot:
        cert.plot(args.plot)
    o = report["overall"]
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: {o['n']} tokens, KS p={o['ks_p']:.4g}, AD p={o['ad_p']:.4g}"
          f", impossible events {report['impossible_events']}", file=sys.stderr)
    if not args.out:
        print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
