"""The `probopt` command line, run as a subprocess on tiny problems, and its pieces."""

import os
import subprocess
import sys

import numpy as np
import pytest

from probopt.benchmark import OPTIMIZERS, WORKLOADS, steps_to_target
from probopt.benchmark._bench import list_benchmarks, run_benchmark
from probopt.benchmark._registry import UnknownNameError, parse_names
from probopt.cli import build_parser, main


def _run(*args, cwd):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore::FutureWarning")
    return subprocess.run(
        [sys.executable, "-m", "probopt.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compare_subprocess_writes_table_png_and_netcdf(tmp_path):
    from probopt.inspect import load_inference_data

    out = tmp_path / "out"
    proc = _run(
        "compare", "--problem", "bowl", "--optimizers", "sgd,meka", "--steps", "6",
        "--seeds", "2", "--no-progress", "--output-dir", str(out), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| optimizer |" in proc.stdout
    for name in ("sgd", "meka"):
        assert f"| {name} |" in proc.stdout
    assert (out / "results.md").read_text().count("|") > 20
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("sgd", "meka"):
        assert (out / "traces" / f"{name}.nc").exists()

    idata = load_inference_data(out / "traces" / "sgd.nc")
    objective = idata["observed_data"]["objective"]
    assert objective.dims == ("chain", "step") and objective.shape == (2, 6)
    # The table's final loss is the seed median of the last recorded objective.
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| sgd |"))
    final = float(row.split("|")[2])
    np.testing.assert_allclose(final, np.median(objective.values[:, -1]), rtol=2e-3)
    # SGD on the bowl is deterministic given the batches: theta <- theta - 0.5 (theta - mean(xi)),
    # so the objective 0.5 |theta|^2 must fall from 45 by roughly a factor 4 per step.
    assert np.all(objective.values[:, 0] < 45.0 / 2)

    meka = load_inference_data(out / "traces" / "meka.nc")
    state = meka["filter_state"]
    assert state["belief.mean"].dims == ("chain", "step", "param")
    assert state.sizes["param"] == 10


def test_unknown_names_exit_nonzero_with_message(tmp_path, capsys, monkeypatch):
    proc = _run("compare", "--optimizers", "sgd,not-an-optimizer", "--steps", "2", cwd=tmp_path)
    assert proc.returncode != 0
    assert "unknown optimizer 'not-an-optimizer'" in proc.stderr
    assert "choose from" in proc.stderr and "meka" in proc.stderr
    assert not any(tmp_path.iterdir()), "nothing may be written on a usage error"
    # The same checks in-process (no second interpreter start).
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--problem", "nope"]) != 0
    assert "unknown problem 'nope'" in capsys.readouterr().err
    assert main(["compare", "--steps", "0"]) != 0
    assert "--steps must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "no-such-benchmark"]) != 0
    assert not any(tmp_path.iterdir())


def test_help_documents_every_option_optimizer_and_problem():
    parser = build_parser()
    compare = parser._subparsers._group_actions[0].choices["compare"]
    text = compare.format_help()
    for action in compare._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.help is not None and action.dest != "help":
            assert action.help.split()[0] in text
    for name in OPTIMIZERS:
        assert name in text
    for name in WORKLOADS:
        assert name in text


def test_parse_names_rejects_unknown_empty_and_duplicates():
    assert parse_names(" sgd, adam ", OPTIMIZERS, "optimizer") == ["sgd", "adam"]
    with pytest.raises(UnknownNameError, match="'foo'"):
        parse_names("sgd,foo", OPTIMIZERS, "optimizer")
    with pytest.raises(UnknownNameError, match="no optimizer"):
        parse_names(" , ", OPTIMIZERS, "optimizer")
    with pytest.raises(UnknownNameError, match="more than once"):
        parse_names("sgd,sgd", OPTIMIZERS, "optimizer")


def test_steps_to_target_first_crossing_and_never():
    objective = np.array([[5.0, 3.0, 1.0, 0.5, 2.0], [5.0, 4.0, 3.0, 2.5, 2.2]])
    np.testing.assert_array_equal(steps_to_target(objective, 1.0), [2.0, np.inf])
    np.testing.assert_array_equal(steps_to_target(objective, 10.0), [0.0, 0.0])


def test_bench_lists_and_runs_scripts(tmp_path):
    marker = tmp_path / "ran.txt"
    (tmp_path / "bench_alpha.py").write_text(f"open({str(marker)!r}, 'w').write('ok')\n")
    (tmp_path / "bench_fails.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "not_a_bench.py").write_text("")
    found = list_benchmarks(tmp_path)
    assert list(found) == ["alpha", "fails"]
    assert run_benchmark(found["alpha"]) == 0 and marker.read_text() == "ok"
    assert run_benchmark(found["fails"]) == 3


def test_trace_trimming_drops_parameter_trees_whole():
    import jax
    import jax.numpy as jnp

    from probopt.benchmark._compare import _trim
    from probopt.filters import GaussianBelief

    params = {"w": jnp.zeros((10, 5)), "b": jnp.zeros(5)}
    state = {
        "belief": GaussianBelief(params, jnp.ones(()), "scalar"),
        "previous_step": params,
        "gain": jnp.ones(()),
        "small": jnp.zeros(3),
    }
    trimmed = _trim(state, jax.tree_util.tree_structure(params), 20)
    assert trimmed["belief"].mean is None and trimmed["belief"].variance.shape == ()
    assert trimmed["previous_step"] is None
    assert trimmed["gain"].shape == () and trimmed["small"].shape == (3,)
    assert _trim(state, jax.tree_util.tree_structure(params), 1000) is state
