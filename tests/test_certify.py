"""Losslessness certificate on a tiny float64 Llama with a sharpened LM head (entropy ~1-2 nats, so a biased
sampler is visible): uniform PIT for exact sampling, rejection of biased ones.

Power and error rates: every case emits ~1,500 tokens (2 prompts x 32 seeded samples x 24 tokens). Under H0 a
level-0.01 test rejects 1 % of seeds; the seeds are fixed, so each case is deterministic. At n = 1,500 KS detects a
CDF deviation of 0.042 (p < 0.01) / 0.050 (p < 0.001); the biased cases deviate by far more (checked below).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specdec.drafters import MedusaDrafter
from specdec.interfaces import Draft, DraftInput
from specdec.research.certify import ProvenanceDrafter, RootOnlyDrafter, run_certificate, step_records
from specdec.research.pit import anderson_darling_uniform, uniformity
from specdec.sampling import SamplingParams, process_logits, sample
from specdec.target import TargetModel
from specdec.tree import TokenTree
from tests.conftest import tiny_llama

PROMPTS = [torch.tensor([3, 17, 8, 3, 17, 8, 40]), torch.tensor([11, 12, 13, 14, 11, 12])]
T1 = SamplingParams(1.0, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_target() -> TargetModel:
    model = tiny_llama(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return TargetModel(model, split_gemv=False)


class SampledTreeDrafter:
    """Draws two depth-1 siblings WITHOUT replacement (exponential race top-2) and one grandchild under the first,
    from a fixed random bigram table processed with the request's settings; reports ``Draft.probs``."""

    vocab_size = 64
    needs_hidden = False

    def __init__(self) -> None:
        self.table = 2.0 * torch.randn(64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def propose(self, batch):
        out = []
        for item in batch:
            root, gen = int(item.history[-1]), item.generator
            q0 = process_logits(self.table[root], item.sampling)
            race = torch.empty_like(q0).exponential_(generator=gen)
            a, b = (q0 / race).topk(2).indices.tolist()
            q1 = process_logits(self.table[a], item.sampling)
            c = int(sample(q1, gen))
            tree = TokenTree(torch.tensor([root, a, b, c]), torch.tensor([-1, 0, 0, 1]))
            out.append(Draft(tree, torch.stack([torch.zeros_like(q0), q0, q0, q1]), without_replacement=True))
        return out

    def accept(self, seq_id, tokens, hidden=None):
        pass

    def release(self, seq_id):
        pass


def _medusa(target: TargetModel) -> MedusaDrafter:
    """Untrained heads: each proposes the target's own top tokens at the root (high acceptance, one-hot)."""
    return MedusaDrafter.untrained(target, num_heads=2, budget=5, topk=2)


def _certify(target, drafter, sampling=T1, against=None, acceptance="exact"):
    return run_certificate(target, {"d": drafter}, PROMPTS, sampling, 24, repeats=32, acceptance=acceptance,
                           certify_params=against).report(0.01)


def test_plain_sampling_gives_a_uniform_pit(sharp_target):
    report = _certify(sharp_target, None)
    assert report["n_tokens"] == 2 * 32 * 24 and report["impossible_events"] == 0
    assert report["passed"], (report["overall"], report["conditional"])


def test_an_exact_tree_drafter_with_sampled_siblings_passes_in_every_valid_split(sharp_target):
    report = _certify(sharp_target, SampledTreeDrafter())
    assert report["passed"], (report["overall"], report["conditional"])
    groups = report["groups"]
    assert groups["conditional:decision,depth=1"]["n"] > 1000 and groups["conditional:resampled"]["n"] > 500
    assert groups["conditional:decision,depth=2"]["n"] > 50, "no depth-1 token was ever accepted"
    assert report["groups_min_ks_p_bonferroni"] > 0.01


def test_an_exact_one_hot_drafter_passes_and_typical_acceptance_with_it_is_rejected(sharp_target):
    """Measured on this model (smooth and position-sensitive variants of ``tiny_llama``): exact KS p 0.19-0.97;
    typical acceptance: marginal p 1e-3 to 2e-8 (1,536 tokens), conditional decisions p < 1e-24."""
    exact = _certify(sharp_target, _medusa(sharp_target))
    assert exact["passed"], (exact["overall"], exact["conditional"])
    groups = exact["groups"]
    assert groups["conditional:decision,depth=1"]["n"] > 1000 and groups["conditional:decision,depth=2"]["n"] > 50
    lossy = _certify(sharp_target, _medusa(sharp_target), acceptance="typical_lossy")
    assert not lossy["passed"] and lossy["overall"]["ad_p"] < 0.01 and lossy["overall"]["ks_p"] < 0.01
    assert lossy["conditional"]["ks_p"] < 1e-6  # the decisions themselves break the rejection rule


def test_a_deliberately_biased_sampler_is_rejected(sharp_target):
    """Tokens drawn at temperature 0.7 but certified against temperature 1.0: too many likely tokens."""
    report = _certify(sharp_target, None, SamplingParams(0.7, seed=0), against=T1)
    assert not report["passed"] and report["overall"]["ks_p"] < 1e-3


def test_step_records_follow_the_tree_and_list_the_children_tried_before_each_token():
    tree = TokenTree(torch.tensor([9, 1, 2, 3]), torch.tensor([-1, 0, 0, 2]))
    recs = step_records(Draft(tree), [2, 3, 7])
    assert [(r.kind, r.depth, [x for x, _ in r.tried]) for r in recs] == [
        ("accepted", 1, [1, 2]), ("accepted", 2, [3]), ("bonus", 3, [])]
    assert [(r.kind, [x for x, _ in r.tried]) for r in step_records(Draft(tree), [2, 5])] == [
        ("accepted", [1, 2]), ("resampled", [3])]
    assert [(r.kind, [x for x, _ in r.tried]) for r in step_records(Draft(tree), [4])] == [("resampled", [1, 2])]


def test_provenance_wrapper_forwards_the_protocol_and_skips_the_prefill_token():
    wrapped = ProvenanceDrafter(RootOnlyDrafter())
    history = torch.tensor([4, 5, 6])
    wrapped.accept(0, torch.tensor([6]))  # prefill: no tree, no record
    [draft] = wrapped.propose([DraftInput(0, history)])
    wrapped.accept(0, torch.tensor([8]))
    assert draft.tree.num_nodes == 1
    assert [(r.kind, r.depth) for r in wrapped.records[history.data_ptr()]] == [("bonus", 1)]


def test_uniformity_statistics_match_scipy_and_detect_a_shift():
    rng = np.random.default_rng(0)
    u = rng.random(2000)
    from scipy import stats

    res = uniformity(u)
    assert res["ks_p"] == pytest.approx(stats.kstest(u, "uniform").pvalue)
    # the AD statistic of U(0, 1) equals scipy's when the normal CDF is applied to standard normal draws
    z = rng.standard_normal(500)
    assert anderson_darling_uniform(stats.norm.cdf(z)) == pytest.approx(
        stats.goodness_of_fit(stats.norm, z, known_params={"loc": 0, "scale": 1}, statistic="ad",
                              n_mc_samples=9).statistic, rel=1e-9)
    assert res["ad_p"] > 0.01 and uniformity(u ** 1.2)["ad_p"] < 1e-3


def test_the_command_module_parses_the_certificate_settings():
    import argparse

    from specdec.app.cmd_certify import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--drafter", "none", "medusa:path=shipped", "--acceptance", "typical_lossy",
                              "--temperature", "0.7", "--repeats", "3"])
    assert args.drafter == ["none", "medusa:path=shipped"] and args.acceptance == "typical_lossy"
    assert (args.temperature, args.repeats, args.alpha) == (0.7, 3, 0.01)


def test_the_pit_histogram_is_written_as_a_png(sharp_target, tmp_path):
    cert = run_certificate(sharp_target, {"d": SampledTreeDrafter()}, PROMPTS[:1], T1, 8, repeats=4)
    cert.plot(str(tmp_path / "pit.png"))
    assert (tmp_path / "pit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(cert.marginal) == 4 * 8 and len(cert.conditional) >= len(cert.marginal)
