"""The ``probopt`` command line: ``probopt compare`` and ``probopt bench``.

``probopt compare`` with no arguments runs the default comparison (Meka,
AdaMeka, Meka+PI, LODO and the optax baselines on the noisy quadratic,
3 seeds), prints a results table and writes a PNG plot and NetCDF traces in a
new folder ``runs/compare/<problem>-<YYYYmmdd-HHMMSS>``. All arguments are
checked before any workload or optimizer is built.  ``probopt bench`` lists or runs ``examples/bench_*.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
import time
from typing import Sequence

DEFAULT_OPTIMIZERS = "meka,adameka,meka-pi,lodo,sgd,adam,prodigy,dog,schedule-free"
DEFAULT_PROBLEM = "noisy-quadratic"
DEFAULT_SEEDS = 3
DEFAULT_OUTPUT = os.path.join("runs", "compare")


#: Files a finished run writes in its output folder; a folder holding any of them is not reused.
RESULT_FILES = ("results.md", "compare.png", "traces")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description and epilog as written and wraps option help at spaces only.

    argparse's default wrapping breaks lines after hyphens, which splits
    optimizer names such as ``meka-pi`` across lines.
    """

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = " ".join(text.split())
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

_PROBLEM_HELP = {
    "noisy-quadratic": "Meka's noisy quadratic, D=20, condition number 1e3 (default)",
    "bowl": "isotropic noisy quadratic bowl, D=10",
    "rosenbrock": "2-D Rosenbrock with additive gradient noise",
    "digits-mlp": "MLP 64-100-10 on scikit-learn digits (full training loss)",
    "mnist1d-mlp": "MLP 40-100-100-10 on locally generated MNIST-1D",
}


def _epilog() -> str:
    from .benchmark._registry import OPTIMIZERS
    from .benchmark._workloads import WORKLOADS

    lines = ["optimizers:"]
    lines += [f"  {name:<14} {spec.description}" for name, spec in OPTIMIZERS.items()]
    lines += ["", "problems:"]
    lines += [f"  {name:<16} {_PROBLEM_HELP.get(name, '')}" for name in WORKLOADS]
    lines += [
        "",
        "outputs (in --output-dir): results.md (the table), compare.png (objective",
        "against steps and wall time), traces/<optimizer>.nc (ArviZ InferenceData:",
        "filter_state, observed_data; open with probopt.inspect.load_inference_data).",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``probopt`` command."""
    parser = argparse.ArgumentParser(
        prog="probopt",
        description="Self-tuning probabilistic optimizers: compare them and run benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{compare,bench}")

    compare = sub.add_parser(
        "compare",
        help="run optimizers on a problem over seeds; print a table, save a plot and traces",
        description=textwrap.fill(
            "Run each optimizer on one problem for several seeds (vmapped, jitted lax.scan), "
            "print a results table (final and best objective, steps to target, wall time per "
            "step and its ratio to SGD measured in the same run), and save a PNG plot and one "
            "NetCDF trace per optimizer. Without options it runs the default comparison on the "
            "noisy quadratic.",
            width=78,
        ),
        formatter_class=_Formatter,
        epilog=_epilog(),
    )
    compare.add_argument("--problem", default=DEFAULT_PROBLEM, help="problem to optimize, see the list below (default: %(default)s)")
    compare.add_argument(
        "--optimizers",
        default=None,
        help=(
            "comma-separated optimizer names (see the list below); by default "
            f"{', '.join(DEFAULT_OPTIMIZERS.split(','))}, skipping any whose module is not installed"
        ),
    )
    compare.add_argument("--steps", type=int, default=None, help="optimization steps (default: the problem's)")
    compare.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="number of seeds, i.e. independent runs (default: %(default)s)")
    compare.add_argument(
        "--batch-size", type=int, default=None, help="minibatch size (default: the problem's)"
    )
    compare.add_argument(
        "--target",
        type=float,
        default=None,
        help="objective value for the 'steps to target' column (default: the problem's)",
    )
    compare.add_argument(
        "--output-dir",
        default=None,
        help="folder for results.md, compare.png and traces/; it must not already hold results "
        f"(default: a new folder {os.path.join(DEFAULT_OUTPUT, '<problem>-<YYYYmmdd-HHMMSS>')})",
    )
    compare.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    compare.add_argument(
        "--max-trace-size",
        type=int,
        default=4096,
        help="state arrays with more numbers than this per step are left out of the traces; "
        "a non-negative integer (default: %(default)s)",
    )

    bench = sub.add_parser(
        "bench",
        help="list or run the performance benchmarks examples/bench_*.py",
        description="Run examples/bench_<name>.py (all of them without a name); --list only lists them.",
        formatter_class=_Formatter,
    )
    bench.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    bench.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def _error(message: str) -> int:
    print(f"probopt: error: {message}", file=sys.stderr)
    return 2


def _check_positive(value: int | None, flag: str) -> str | None:
    if value is not None and value < 1:
        return f"{flag} must be a positive integer; got {value}."
    return None


def _nearest_existing(path: str) -> str:
    """``path`` or its closest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_folder(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be (created and) written as an output folder, or ``None``."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{flag} {path!r} is a file, not a folder."
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        return f"{flag} {path!r} cannot be created: {existing!r} is a file, not a folder."
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {path!r} is not writable ({existing!r} does not allow writing)."
    return None


def default_output_dir(problem: str, base: str = DEFAULT_OUTPUT, now: float | None = None) -> str:
    """A new folder ``<base>/<problem>-<YYYYmmdd-HHMMSS>`` for one run.

    When that folder already exists (two runs in the same second), ``-2``,
    ``-3``, ... is appended until the name is free.
    """
    stem = os.path.join(base, f"{problem}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}")
    path, suffix = stem, 1
    while os.path.exists(path):
        suffix += 1
        path = f"{stem}-{suffix}"
    return path


def check_compare_args(args: argparse.Namespace) -> str | None:
    """Validate ``probopt compare``'s arguments without building anything.

    Fills in ``args.names`` (the optimizer list) and ``args.output_dir`` (the
    default per-run folder when none was given). Returns the error message of
    the first invalid argument, or ``None``. Only the (light) name registries
    are imported; no workload, optimizer or plot is touched, and nothing is
    written.
    """
    from .benchmark._registry import OPTIMIZERS, UnknownNameError, parse_names
    from .benchmark._workloads import WORKLOADS

    if args.problem not in WORKLOADS:
        return f"unknown problem {args.problem!r}; choose from: {', '.join(WORKLOADS)}."
    try:
        args.names = parse_names(
            DEFAULT_OPTIMIZERS if args.optimizers is None else args.optimizers, OPTIMIZERS, "optimizer"
        )
    except UnknownNameError as error:
        return str(error)
    for value, flag in ((args.steps, "--steps"), (args.seeds, "--seeds"), (args.batch_size, "--batch-size")):
        problem = _check_positive(value, flag)
        if problem:
            return problem
    if args.max_trace_size < 0:
        return f"--max-trace-size must be a non-negative integer; got {args.max_trace_size}."
    if args.target is not None and not math.isfinite(args.target):
        return f"--target must be a finite number; got {args.target}."
    if args.output_dir is None:
        problem = _check_folder(DEFAULT_OUTPUT, "the default output folder")
        if problem:
            return problem
        args.output_dir = default_output_dir(args.problem)
        return None
    problem = _check_folder(args.output_dir, "--output-dir")
    if problem:
        return problem
    if os.path.isdir(args.output_dir):
        found = [name for name in RESULT_FILES if os.path.exists(os.path.join(args.output_dir, name))]
        if found:
            return (
                f"--output-dir {args.output_dir!r} already holds results ({', '.join(found)}); "
                "give a new or empty folder, or leave --output-dir out for a new one per run."
            )
    return None


def _make_folder(path: str) -> bool:
    """Create ``path`` (and parents); ``True`` when this call created it."""
    existed = os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    return not existed


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def run_compare(args: argparse.Namespace) -> int:
    """The ``compare`` subcommand; returns the exit code."""
    problem = check_compare_args(args)
    if problem:
        return _error(problem)
    out = args.output_dir
    created = _make_folder(out)
    print(f"probopt compare: output folder {out}", flush=True)
    try:
        code = _compare_into(args, out)
    finally:
        # A run that fails or is interrupted before writing leaves no empty folder behind.
        if created:
            _remove_if_empty(out)
    return code


def _compare_into(args: argparse.Namespace, out: str) -> int:
    """Run the comparison of validated ``args`` and write its outputs into ``out``."""
    from .benchmark._compare import compare
    from .benchmark._registry import UnavailableError
    from .benchmark._report import format_skipped, plot_comparison, results_table, save_traces
    from .benchmark._workloads import make_workload

    names = args.names
    try:
        workload = make_workload(args.problem)
    except ImportError as error:
        return _error(f"problem {args.problem!r} is not available in this installation: {error}")
    steps = args.steps or workload.default_steps
    batch_size = args.batch_size or workload.default_batch_size
    print(
        f"probopt compare: {workload.name} ({workload.description}); "
        f"{len(names)} optimizer{'' if len(names) == 1 else 's'}, "
        f"{steps} steps, {args.seeds} seed{'' if args.seeds == 1 else 's'}, batch size {batch_size}",
        flush=True,
    )
    try:
        result = compare(
            workload,
            names,
            steps=steps,
            seeds=args.seeds,
            batch_size=batch_size,
            target=args.target,
            skip_unavailable=args.optimizers is None,
            progress_bar=not args.no_progress,
            max_trace_size=args.max_trace_size,
        )
    except UnavailableError as error:
        return _error(str(error))
    if result.skipped:
        print(format_skipped(result), file=sys.stderr)
    if not result.runs:
        return _error("no optimizer could be run.")

    table = results_table(result)
    print(table)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as handle:
        handle.write(f"# {workload.name}: {steps} steps, {args.seeds} seeds, batch size {batch_size}\n\n")
        handle.write(table + "\n")
    plot_path = os.path.join(out, "compare.png")
    plot_comparison(result, plot_path)
    trace_paths = save_traces(result, os.path.join(out, "traces"))
    print(f"\nwrote {os.path.join(out, 'results.md')}, {plot_path} and {len(trace_paths)} traces in "
          f"{os.path.join(out, 'traces')}")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand; returns the exit code (the first failing script's)."""
    from .benchmark._bench import examples_directory, list_benchmarks, run_benchmark

    available = list_benchmarks()
    if args.list or not available:
        if not available:
            print(f"no benchmark scripts (bench_*.py) in {examples_directory()}")
            return 0 if args.list else 1
        for name, path in available.items():
            print(f"{name:<24} {path}")
        return 0
    names = args.names or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        return _error(f"unknown benchmark {', '.join(map(repr, unknown))}; choose from: {', '.join(available)}.")
    status = 0
    for name in names:
        print(f"== bench {name} ({available[name]})", flush=True)
        code = run_benchmark(available[name])
        if code != 0:
            print(f"probopt: bench {name} failed with exit code {code}", file=sys.stderr)
            status = status or code
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``probopt`` command; returns the exit code.

    Ctrl-C prints ``probopt: interrupted`` and gives exit status 130; called
    with ``argv=None`` (as the installed command) the process then ends at
    once with ``os._exit(130)``, otherwise ``130`` is returned.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # `probopt` alone runs the default comparison, like `probopt compare`.
        args = parser.parse_args(["compare"])
    try:
        if args.command == "compare":
            return run_compare(args)
        return run_bench(args)
    except KeyboardInterrupt:
        # Ctrl-C: one line and the conventional 128 + SIGINT status, no traceback.
        print("probopt: interrupted", file=sys.stderr, flush=True)
        if argv is None:
            # Run as the command: leave without the interpreter's shutdown. Exiting
            # normally while XLA is still compiling or running a chunk of steps
            # can end in a segmentation fault (exit status -11) instead of 130.
            sys.stdout.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
