"""Conformance checks for variants: the property suite lorazoo runs over every registered variant,
exposed so a third-party plugin can run it on its own variant::

    import lorazoo.testing
    lorazoo.testing.run_conformance("my_variant")

Requires hypothesis (``pip install lorazoo[test]``).
"""

from .conformance import (
    CHECK_DTYPES,
    CHECKS,
    MERGE_BYTES,
    STATS,
    Case,
    Layers,
    adapt,
    build,
    cases,
    perturb,
    run_conformance,
)
from .tolerance import accumulation_roundoff, magnitude, merge_tolerance, unit_roundoff

__all__ = [
    "CHECKS",
    "CHECK_DTYPES",
    "Case",
    "Layers",
    "MERGE_BYTES",
    "STATS",
    "accumulation_roundoff",
    "adapt",
    "build",
    "cases",
    "magnitude",
    "merge_tolerance",
    "perturb",
    "run_conformance",
    "unit_roundoff",
]
