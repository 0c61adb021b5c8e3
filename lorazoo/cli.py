"""The ``lorazoo`` command: ``lorazoo bench`` (the comparative benchmark), ``lorazoo variants``,
``lorazoo inspect`` (what an adapter file or PEFT folder holds), ``lorazoo convert`` (between
lorazoo files and PEFT folders) and ``lorazoo merge`` (a Hugging Face model folder with an adapter
merged in).

``main(argv)`` returns the exit status instead of exiting, so tests and notebooks can call it:
0 on success, 2 for a bad option (with a message saying what would be right, and nothing written),
1 for a failure while running.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import LorazooError


class UsageError(LorazooError, ValueError):
    """A command-line option that cannot be used."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}\n(see '{self.prog} --help')")


def parse_lr(text: str) -> dict[str, float]:
    """``"2e-3"`` → every run; ``"vera=1e-2,full=1e-4"`` → those runs. Items may be repeated."""
    out: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        key = name.strip() if sep else "*"
        if sep and not key:
            raise UsageError(f"--lr {text!r}: '{item}' has no run name before '='; write NAME=VALUE or VALUE")
        try:
            lr = float(value)
        except ValueError:
            raise UsageError(
                f"--lr {text!r}: {value.strip()!r} is not a number; write e.g. --lr 2e-3 or --lr vera=1e-2"
            ) from None
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(
                f"--lr {text!r}: a learning rate must be a positive finite number, got {value.strip()}"
            )
        out[key] = lr
    if not out:
        raise UsageError("--lr is empty; write e.g. --lr 2e-3 or --lr vera=1e-2")
    return out


def _names(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise UsageError(f"{option} {text!r}: give a comma-separated list without empty items")
    return items


def _int_at_least(low: int, what: str):
    """An argparse type: an integer ``>= low`` (``what`` names the range in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


BENCH_HELP = """\
Pre-train a small byte-level model on CPython's standard-library source (once; cached), adapt
it to English prose from the Python documentation with every registered variant under one budget,
and compare: trainable parameters, adapter file size, training speed, peak memory, what each run
learned (target-domain bits per byte) and forgot (source-domain bits per byte), the merged-vs-
unmerged logit difference and the unmerged/merged latency ratio. Baselines: the untouched base and
full fine-tuning. Every run is repeated over several seeds: figures are means with 95% intervals
and comparisons are paired by seed. --claims checks each variant's paper claims (holds, fails or
inconclusive). Writes results.json, report.md and (with matplotlib) figure.png to --out.
See docs/bench.md."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lorazoo",
        description="lorazoo: the LoRA family of fine-tuning methods behind one interface.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    b = sub.add_parser(
        "bench",
        help="compare the registered variants on a small pre-trained model",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("--variants", metavar="A,B,C", help="variants to run (default: every registered one)")
    b.add_argument("--steps", type=_positive_int, help="training steps per run (default 60; --quick: 20)")
    b.add_argument(
        "--rank",
        type=_positive_int,
        help="comparable rank (default 8; --quick: 4), passed to each variant's bench_kwargs: LoRA-like "
        "variants use it as r, others their own default r scaled by rank/8 (VeRA: 32×rank)",
    )
    b.add_argument(
        "--targets",
        metavar="NAMES",
        help="modules to adapt, comma-separated (default: all-linear, i.e. every "
        "projection but the output head; e.g. q_proj,v_proj)",
    )
    b.add_argument(
        "--seeds",
        metavar="N|S1,S2,…",
        help="seeds to repeat every run over: a count (--seeds 3 = seeds 0,1,2) or a list (--seeds 0,5); "
        "a seed sets the adapter initialisation and the batch order on the one cached base "
        "(default 3; --quick: 2). Figures are means with 95%% intervals; comparisons are paired by seed",
    )
    b.add_argument(
        "--ranks",
        metavar="R1,R2,…",
        help="a rank sweep: also run every variant at these ranks (e.g. 4,16,64); the report plots "
        "learned bpb against rank per variant",
    )
    b.add_argument(
        "--claims",
        action="store_true",
        help="add the runs the variants' paper claims need (full fine-tuning, rank 64, loss curves) "
        "and report whether each claim holds, fails or is inconclusive",
    )
    b.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default ./lorazoo-bench/<UTC timestamp>); must not exist or be empty",
    )
    b.add_argument(
        "--quick", action="store_true", help="a smoke run: tiny model, few steps, small data (seconds)"
    )
    b.add_argument(
        "--lr",
        action="append",
        metavar="LR|NAME=LR",
        help="learning rate for every run (--lr 2e-3) or one run (--lr vera=1e-2, --lr full=1e-4); may be "
        "repeated. Default: each variant's recommended_lr; full fine-tuning 3e-4",
    )
    b.add_argument(
        "--model",
        metavar="PATH",
        help="adapt a local Hugging Face model directory instead "
        "(needs transformers; no pre-training; tokenised with its tokenizer)",
    )
    b.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache folder for the pre-trained base (default: "
        "$LORAZOO_CACHE_DIR, else $XDG_CACHE_HOME/lorazoo, else ~/.cache/lorazoo)",
    )
    b.add_argument(
        "--threads",
        type=_positive_int,
        help="torch threads (default: the CPUs this process may use, less those the load average shows busy)",
    )
    b.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    sub.add_parser("variants", help="list the registered variants and their defaults")
    _add_file_commands(parser, sub)
    return parser


def _add_file_commands(parser: argparse.ArgumentParser, sub) -> None:
    """``--version``, ``inspect`` and ``convert`` (adapter files and PEFT folders)."""
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lorazoo {__version__}")
    i = sub.add_parser(
        "inspect",
        help="show what a lorazoo adapter file or PEFT adapter folder holds",
        description="Show an adapter's format (lorazoo file or PEFT folder), variant, config, adapted "
        "modules with their shapes and ranks, and tensor sizes. Needs no model.",
    )
    i.add_argument("path", metavar="FILE|FOLDER", help="a lorazoo .safetensors file or a PEFT adapter folder")
    c = sub.add_parser(
        "convert",
        help="convert between a lorazoo adapter file and a PEFT adapter folder",
        description="Convert a lorazoo adapter file into a PEFT adapter folder (--to peft) or a PEFT "
        "folder into a lorazoo file (--to lorazoo), without a model. Refused where the file alone does "
        "not determine the result: OLoRA to PEFT (needs the base's QR factors; save from the model "
        "with lorazoo.save(model, folder, format='peft')) and VeRA from PEFT (needs each layer's input "
        "size; load the folder with lorazoo.load(model, folder)).",
    )
    c.add_argument("src", metavar="IN", help="a lorazoo .safetensors file or a PEFT adapter folder")
    c.add_argument("dst", metavar="OUT", help="where to write; must not exist")
    c.add_argument("--to", required=True, choices=("peft", "lorazoo"), help="the format to write")
    _add_merge_command(sub)


def _add_merge_command(sub) -> None:
    m = sub.add_parser(
        "merge",
        help="write a Hugging Face model folder with an adapter merged into its weights",
        description="Load the Hugging Face model in --model (needs transformers), apply the adapter "
        "(a lorazoo file or a PEFT folder), merge it into the weights, put the original module "
        "classes back (lorazoo.merge_and_unload) and write the plain model with save_pretrained to "
        "--out, with the other files of --model (tokenizer, ...). --out must not exist or be empty; "
        "it is written under a temporary name beside it and renamed when complete.",
    )
    m.add_argument("--model", required=True, metavar="HF_FOLDER", help="a Hugging Face model folder")
    m.add_argument(
        "--adapter", required=True, metavar="FILE|FOLDER", help="a lorazoo adapter file or a PEFT folder"
    )
    m.add_argument("--out", required=True, metavar="FOLDER", help="the merged model folder to write")


def _merge(args: argparse.Namespace) -> int:
    from .hf import merge_folder

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"--out {args.out!r} exists and is not an empty folder; choose a new folder (nothing was written)"
        )
    written = merge_folder(args.model, args.adapter, out)
    print(f"wrote {written}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .peft_format import describe

    print(describe(args.path))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .peft_format import convert

    if Path(args.dst).exists():
        raise UsageError(f"OUT {args.dst!r} already exists; choose a new path (nothing was written)")
    written = convert(args.src, args.dst, args.to)
    print(f"wrote {written}")
    return 0


def _default_out() -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("lorazoo-bench") / stamp


def parse_seeds(text: str) -> list[int]:
    """``"3"`` → seeds 0, 1, 2; ``"0,5,7"`` → those seeds (``"4,"`` is the one seed 4)."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in items if t]
    except ValueError:
        raise UsageError(
            f"--seeds {text!r}: write a count (--seeds 3) or a list of seeds (--seeds 0,5)"
        ) from None
    if not values or any(v < 0 for v in values):
        raise UsageError(
            f"--seeds {text!r}: seeds are non-negative integers; write e.g. --seeds 3 or --seeds 0,5"
        )
    if len(items) == 1:
        if values[0] < 1:
            raise UsageError("--seeds 0: give at least one seed (--seeds 1 runs seed 0)")
        return list(range(values[0]))
    return values


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(t) for t in _names(text, "--ranks")]
    except ValueError:
        raise UsageError(f"--ranks {text!r}: write positive integers, e.g. --ranks 4,16,64") from None
    if any(r < 1 for r in ranks):
        raise UsageError(f"--ranks {text!r}: ranks must be positive, e.g. --ranks 4,16,64")
    return ranks


def _bench(args: argparse.Namespace) -> int:
    from .bench.plan import Options
    from .bench.report import console, write_outputs
    from .bench.runner import run_bench

    lrs: dict[str, float] = {}
    for text in args.lr or ():
        lrs.update(parse_lr(text))
    out = Path(args.out) if args.out else _default_out()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {str(out)!r} already exists and is not an empty folder; choose a new folder")
    opts = Options(
        variants=_names(args.variants, "--variants") if args.variants is not None else None,
        steps=args.steps,
        rank=args.rank,
        targets=_names(args.targets, "--targets") if args.targets is not None else None,
        seeds=parse_seeds(args.seeds) if args.seeds is not None else None,
        ranks=parse_ranks(args.ranks) if args.ranks is not None else None,
        claims=args.claims,
        lr=lrs,
        quick=args.quick,
        model_path=args.model,
        cache_dir=args.cache_dir,
        threads=args.threads,
        device=args.device,
        progress=not args.no_progress,
    )
    result = run_bench(opts)
    written = write_outputs(result, out)
    print(console(result))
    print(f"results: {written}")
    return 0


def _variants() -> int:
    import dataclasses

    from .registry import variant, variants

    for name in variants():
        cls = variant(name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.config_class))
        print(f"{name:10s} recommended_lr={cls.recommended_lr:g}  {fields}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from .bench.backends import BenchError

    parser = build_parser()
    args: argparse.Namespace | None = None
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "variants":
            return _variants()
        if args.command == "merge":
            return _merge(args)
        if args.command in ("inspect", "convert"):
            return _inspect(args) if args.command == "inspect" else _convert(args)
        return _bench(args)
    except (UsageError, BenchError) as exc:
        where = f"lorazoo {args.command}" if args is not None and args.command else "lorazoo"
        print(f"{where}: error: {exc}", file=sys.stderr)
        return 2
    except LorazooError as exc:
        print(f"lorazoo: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lorazoo: interrupted; nothing was written", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2


if __name__ == "__main__":
    sys.exit(main())
