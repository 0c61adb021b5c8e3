"""The comparative benchmark behind ``lorazoo bench`` (see ``docs/bench.md``).

``run_bench(Options(...))`` runs it in-process and returns every figure as a dict;
``lorazoo.bench.report`` turns that into the table, ``results.json``, ``report.md`` and a figure.
``lorazoo.bench.model`` is the Llama-like decoder it adapts (also used by ``benchmarks/``).
"""

from .backends import BenchError
from .runner import DEFAULT, QUICK, Options, Recipe, comparable_hyper, run_bench

__all__ = ["DEFAULT", "QUICK", "BenchError", "Options", "Recipe", "comparable_hyper", "run_bench"]
