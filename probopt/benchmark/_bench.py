"""Discover and run the performance benchmark scripts ``examples/bench_*.py``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

__all__ = ["examples_directory", "list_benchmarks", "run_benchmark"]


def examples_directory() -> pathlib.Path:
    """The repository's ``examples/`` folder (next to the ``probopt`` package)."""
    return pathlib.Path(__file__).resolve().parents[2] / "examples"


def list_benchmarks(directory: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """Benchmark scripts by name: ``examples/bench_<name>.py`` is listed as ``<name>``."""
    folder = pathlib.Path(directory) if directory is not None else examples_directory()
    if not folder.is_dir():
        return {}
    return {path.stem[len("bench_") :]: path for path in sorted(folder.glob("bench_*.py"))}


def run_benchmark(path: str | os.PathLike, args: list[str] | None = None) -> int:
    """Run one script with the current interpreter; return its exit code.

    The script's output goes straight to this process's stdout/stderr.
    """
    command = [sys.executable, os.fspath(path), *(args or [])]
    return subprocess.run(command, check=False).returncode
