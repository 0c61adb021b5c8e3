"""The points where the engine's long-running state changes may be interrupted.

Merge, unmerge, eject, exact reverts and base rewrites call :func:`checkpoint` between row
chunks of a weight and between layers. It does nothing. Its purpose is to name the places where a
``KeyboardInterrupt`` (or any other exception) can arrive in the middle of a change, so a test
can replace it with a function that raises at the k-th call and check that the model is then
either fully in the new state or bit for bit in the old one.

Rollback code never calls it: undoing a partial change must not be interrupted by the same test.
"""

from __future__ import annotations


def checkpoint() -> None:
    """A point between two chunks of work where an interrupt may arrive. Does nothing."""
