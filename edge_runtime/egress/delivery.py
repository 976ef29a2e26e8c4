"""What became of one result object at its destination, in the same words for every kind of destination.

The sender turns a :class:`Delivery` into the outbox row's next state; the DIMSE and the STOW-RS paths only say
what happened, so retry and back-off are decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Delivery"]


@dataclass(frozen=True)
class Delivery:
    """``sent``: the destination stored it. Otherwise ``why`` it was not, and whether that is ``final`` (the
    destination refused the object itself and would refuse it again) or worth another attempt later."""

    sent: bool
    why: str = ""
    final: bool = False

    @classmethod
    def ok(cls) -> Delivery:
        return cls(True)

    @classmethod
    def retry(cls, why: str) -> Delivery:
        return cls(False, why)

    @classmethod
    def refused(cls, why: str) -> Delivery:
        return cls(False, why, final=True)
