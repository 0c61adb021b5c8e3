"""The comparative benchmark behind ``lorazoo bench`` (see ``docs/bench.md``).

``run_bench(Options(...))`` runs it in-process and returns every figure as a dict;
``lorazoo.bench.report`` turns that into the tables, ``results.json``, ``report.md`` and a figure.
``lorazoo.bench.model`` is the Llama-like decoder it adapts (also used by ``benchmarks/``).
"""

from .backends import BenchError
from .plan import DEFAULT, QUICK, Options, Recipe, comparable_hyper, make_plan
from .runner import run_bench, run_one

__all__ = [
    "DEFAULT",
    "QUICK",
    "BenchError",
    "Options",
    "Recipe",
    "comparable_hyper",
    "make_plan",
    "run_bench",
    "run_one",
]
