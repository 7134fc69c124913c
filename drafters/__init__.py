"""Drafters: each proposes token trees through the :class:`specdec.interfaces.Drafter` protocol.

One drafting method per module; :data:`DRAFTERS` is the explicit registry the CLI and experiments use.
"""

from __future__ import annotations

from typing import Any

from specdec.drafters.ngram import NgramDrafter
from specdec.interfaces import Drafter

DRAFTERS: dict[str, type] = {"ngram": NgramDrafter}


def make_drafter(name: str, **kwargs: Any) -> Drafter | None:
    """Build a drafter by registry name; ``"none"`` means autoregressive decoding (returns ``None``)."""
    if name == "none":
        return None
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}; choose one of {['none', *sorted(DRAFTERS)]}")
    return DRAFTERS[name](**kwargs)


__all__ = ["DRAFTERS", "NgramDrafter", "make_drafter"]
