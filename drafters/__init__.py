"""Drafters: each proposes token trees through the :class:`specdec.interfaces.Drafter` protocol.

One drafting method per module; each module registers its name, options and builder with
:mod:`specdec.drafters.registry` (importing this package imports them all). A drafter is named by a spec string
``NAME[:key=value,...]``, e.g. ``ngram``, ``self:layers=8,tree=dynamic``, ``draft-model:path=/models/small``.
"""

from __future__ import annotations

from specdec.drafters.draft_model import DraftModelDrafter  # noqa: I001 - registration order = listing order
from specdec.drafters.eagle import EagleDrafter
from specdec.drafters.eagle3 import Eagle3Drafter
from specdec.drafters.formats import load_drafter
from specdec.drafters.hybrid import HybridDrafter
from specdec.drafters.medusa import MedusaDrafter
from specdec.drafters.ngram import NgramDrafter
from specdec.drafters.registry import SHIPPED, DrafterSpec, Option, build_drafter, register, shipped_weights
from specdec.drafters.self_spec import SelfSpeculativeDrafter


@register("none", help="no drafter: plain autoregressive decoding through the same engine")
def _build_none(target):
    return None


from specdec.drafters.registry import REGISTRY  # noqa: E402

DRAFTER_NAMES = tuple(REGISTRY)

__all__ = [
    "DRAFTER_NAMES", "SHIPPED", "DraftModelDrafter", "DrafterSpec", "Eagle3Drafter", "EagleDrafter", "HybridDrafter",
    "MedusaDrafter", "NgramDrafter", "Option", "SelfSpeculativeDrafter", "build_drafter", "load_drafter", "register",
    "shipped_weights",
]
