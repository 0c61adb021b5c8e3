"""Conformance checks for variants: the property suite lorazoo runs over every registered variant,
exposed so a third-party plugin can run it on its own variant::

    import lorazoo.testing
    lorazoo.testing.run_conformance("my_variant")

A third-party layer kind runs its checks with ``lorazoo.testing.run_kind_conformance("my_kind")``.

Requires hypothesis (``pip install lorazoo[test]``).
"""

from .conformance import (
    CHECK_DTYPES,
    CHECKS,
    MERGE_BYTES,
    STATS,
    Case,
    KindLayers,
    Layers,
    adapt,
    build,
    cases,
    check_kind,
    perturb,
    run_conformance,
    run_kind_conformance,
)
from .tolerance import accumulation_roundoff, magnitude, merge_tolerance, unit_roundoff

__all__ = [
    "CHECKS",
    "CHECK_DTYPES",
    "Case",
    "KindLayers",
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
    "run_kind_conformance",
    "check_kind",
    "unit_roundoff",
]
