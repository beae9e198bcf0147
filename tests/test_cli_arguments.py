"""`probopt compare`'s argument checks, output folders, help text and Ctrl-C."""

import ast
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import probopt.cli as cli
from probopt.benchmark import OPTIMIZERS, WORKLOADS
from probopt.cli import build_parser, check_compare_args, default_output_dir, main

_ENV = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore::FutureWarning")


def _compare_args(*argv):
    return build_parser().parse_args(["compare", *argv])


def _forbid_work(monkeypatch):
    """Make building a workload or running a comparison fail the test."""
    import probopt.benchmark._compare as compare_module
    import probopt.benchmark._workloads as workloads_module

    def boom(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(workloads_module, "make_workload", boom)
    monkeypatch.setattr(compare_module, "compare", boom)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be a positive integer; got 0"),
        (["--seeds", "-3"], "--seeds must be a positive integer; got -3"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--max-trace-size", "-1"], "--max-trace-size must be a non-negative integer; got -1"),
        (["--target", "nan"], "--target must be a finite number; got nan"),
        (["--target=-inf"], "--target must be a finite number; got -inf"),
        (["--problem", "nope"], "unknown problem 'nope'; choose from: noisy-quadratic"),
        (["--optimizers", "sgd,mekapi"], "unknown optimizer 'mekapi'; choose from: meka"),
        (["--optimizers", "sgd,sgd"], "optimizer listed more than once: sgd"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("probopt: error: ") and message in captured.err
    assert captured.out == ""
    assert not any(tmp_path.iterdir()), "nothing may be written on a usage error"


def test_output_dir_that_is_a_file_is_an_error(tmp_path, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    afile = tmp_path / "a-file"
    afile.write_text("keep")
    assert main(["compare", "--output-dir", str(afile)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    # A folder below a file cannot be created either.
    assert main(["compare", "--output-dir", str(afile / "sub")]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert afile.read_text() == "keep"


@pytest.mark.parametrize("existing", ["results.md", "compare.png", "traces"])
def test_output_dir_with_results_is_not_overwritten(existing, tmp_path, monkeypatch, capsys):
    _forbid_work(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    if existing == "traces":
        (out / "traces").mkdir()
    else:
        (out / existing).write_text("old")
    assert main(["compare", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and existing in err
    assert sorted(p.name for p in out.iterdir()) == [existing]
    if existing != "traces":
        assert (out / existing).read_text() == "old"


def test_empty_or_new_output_dir_is_accepted(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("unrelated files are fine")
    args = _compare_args("--output-dir", str(empty))
    assert check_compare_args(args) is None and args.output_dir == str(empty)
    args = _compare_args("--output-dir", str(tmp_path / "new" / "deeper"), "--optimizers", " sgd, meka ")
    assert check_compare_args(args) is None and args.names == ["sgd", "meka"]
    assert not (tmp_path / "new").exists(), "checking must not create the folder"


def test_default_output_dir_is_per_run_and_never_reused(tmp_path):
    base = tmp_path / "runs"
    now = time.mktime((2026, 3, 4, 5, 6, 7, 0, 0, -1))
    first = default_output_dir("bowl", str(base), now)
    assert first == os.path.join(str(base), "bowl-20260304-050607")
    os.makedirs(first)
    second = default_output_dir("bowl", str(base), now)
    assert second == first + "-2"
    os.makedirs(second)
    assert default_output_dir("bowl", str(base), now) == first + "-3"
    assert default_output_dir("rosenbrock", str(base), now).endswith("rosenbrock-20260304-050607")


def test_default_output_dir_is_filled_in_by_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = _compare_args("--problem", "bowl")
    assert check_compare_args(args) is None
    assert re.fullmatch(r"runs/compare/bowl-\d{8}-\d{6}", args.output_dir.replace(os.sep, "/"))
    assert not (tmp_path / "runs").exists()


def test_cli_module_imports_only_the_standard_library_at_top_level():
    with open(cli.__file__, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no package-relative import at top level"
            top.add(node.module.split(".")[0])
    assert top <= {"__future__", "argparse", "math", "os", "sys", "textwrap", "time", "typing"}


def test_argument_error_is_fast_and_loads_no_plotting(tmp_path):
    # What the interpreter needs anyway to import the probopt package (jax, optax).
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import probopt"], cwd=tmp_path, env=_ENV, check=True, timeout=120)
    baseline = time.perf_counter() - start
    code = (
        "import sys; from probopt.cli import main; rc = main(['compare', '--steps', '0']); "
        "print(sorted(m for m in ('matplotlib', 'arviz', 'sklearn') if m in sys.modules)); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_ENV, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2 and "--steps must be a positive integer" in proc.stderr
    assert proc.stdout.strip() == "[]", "argument checks must not import plotting or data modules"
    # The checks themselves add well under a second to the package import; 5 s allows a loaded machine.
    assert elapsed <= max(5.0, baseline + 2.0), (elapsed, baseline)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("columns", ["50", "80", "120"])
def test_help_never_breaks_a_name_at_its_hyphen(columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", columns)
    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    text = compare.format_help()
    assert re.search(r"[A-Za-z]-\n", text) is None, text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--optimizers"))
    block = " ".join(lines[start:start + 8])
    for name in cli.DEFAULT_OPTIMIZERS.split(","):
        assert re.search(rf"(^|[\s,]){re.escape(name)}[,\s]", block), name
    # Every optimizer and problem is listed one per line in the epilog.
    for name in OPTIMIZERS:
        assert any(line.split()[:1] == [name] for line in lines), name
    for name in WORKLOADS:
        assert any(line.split()[:1] == [name] for line in lines), name


@pytest.mark.parametrize("optimizers, header", [("sgd", "1 optimizer, "), ("sgd,meka", "2 optimizers, ")])
def test_header_is_pluralised_and_interrupt_exits_130(optimizers, header, tmp_path, monkeypatch, capsys):
    import probopt.benchmark._compare as compare_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "compare", interrupted)
    out = tmp_path / "out"
    assert main(["compare", "--problem", "bowl", "--optimizers", optimizers, "--seeds", "1", "--output-dir", str(out)]) == 130
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"probopt compare: output folder {out}"
    assert header in captured.out and "1 seed, " in captured.out
    assert captured.err == "probopt: interrupted\n"
    assert not out.exists(), "an interrupted run leaves no empty folder behind"


def test_sigint_during_compare_stops_with_130_and_no_traceback(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "probopt.cli", "compare", "--problem", "bowl", "--optimizers", "sgd",
         "--steps", "1000000", "--seeds", "1", "--no-progress", "--output-dir", str(out)],
        cwd=tmp_path, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first = proc.stdout.readline()
        assert first.startswith("probopt compare: output folder"), first
        header = proc.stdout.readline()
        assert header.startswith("probopt compare: bowl"), header
        time.sleep(1.0)  # now compiling or running the optimizer
        assert proc.poll() is None, "the run must still be going"
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        stopped = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "probopt: interrupted"
    assert stopped < 30, stopped
    assert not out.exists()
