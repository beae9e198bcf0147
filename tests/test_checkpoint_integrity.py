"""Checkpoint integrity: exact templates, checksums, paths, failed and killed saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from probopt import checkpoint
from probopt.optimizers import meka

DIM = 3


def _state():
    params = jnp.arange(DIM, dtype=jnp.float32)
    return params, meka(0.1).init(params), jax.random.key(3)


def _like():
    params = jnp.zeros(DIM, jnp.float32)
    return params, meka(0.1).init(params), jax.random.key(0)


# --------------------------------------------------------------- 1. exact template


def test_load_rejects_a_template_that_is_a_prefix_of_the_saved_tree(tmp_path):
    path = tmp_path / "state.eqx"
    checkpoint.save(path, _state())
    params, state, _ = _like()
    for prefix in [(params, state), params]:
        with pytest.raises(ValueError, match="fewer leaves") as info:
            checkpoint.load(path, prefix)
        assert str(path) in str(info.value)
    # The full template still loads, bit for bit.
    loaded = checkpoint.load(path, _like())
    np.testing.assert_array_equal(loaded[0], _state()[0])


def test_load_rejects_a_template_with_more_leaves(tmp_path):
    path = tmp_path / "state.eqx"
    params = jnp.ones(DIM)
    checkpoint.save(path, params)
    with pytest.raises(ValueError, match="like"):
        checkpoint.load(path, (params, params))


# --------------------------------------------------------------- 2. integrity


def test_a_flipped_payload_byte_is_detected(tmp_path):
    path = tmp_path / "state.eqx"
    checkpoint.save(path, jnp.zeros(64, jnp.float32))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last float: still a well-formed .npy record
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted.*SHA-256") as info:
        checkpoint.load(path, jnp.zeros(64, jnp.float32))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [10, 60, -1])
def test_a_truncated_file_is_detected(tmp_path, keep):
    path = tmp_path / "state.eqx"
    checkpoint.save(path, jnp.zeros(64, jnp.float32))
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"\.eqx. is truncated") as info:
        checkpoint.load(path, jnp.zeros(64, jnp.float32))
    assert str(path) in str(info.value)


def test_trailing_bytes_are_detected(tmp_path):
    path = tmp_path / "state.eqx"
    checkpoint.save(path, jnp.zeros(4))
    with open(path, "ab") as file:
        file.write(b"junk")
    with pytest.raises(ValueError, match="too long"):
        checkpoint.load(path, jnp.zeros(4))


def test_a_file_that_is_not_a_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a checkpoint")
    with pytest.raises(ValueError, match="not a probopt checkpoint"):
        checkpoint.load(path, jnp.zeros(4))


def test_a_headerless_equinox_file_from_older_versions_still_loads(tmp_path):
    path = tmp_path / "old.eqx"
    eqx.tree_serialise_leaves(path, jnp.arange(4.0))
    np.testing.assert_array_equal(checkpoint.load(path, jnp.zeros(4)), jnp.arange(4.0))
    with pytest.raises(ValueError, match="fewer leaves"):
        checkpoint.load(path, ())


# --------------------------------------------------------------- 3. suffixes


def test_a_path_without_extension_round_trips_and_is_used_exactly(tmp_path):
    old = tmp_path / "run.eqx"
    checkpoint.save(old, jnp.full(4, 1.0))
    path = tmp_path / "run"
    checkpoint.save(path, jnp.full(4, 2.0))
    assert sorted(os.listdir(tmp_path)) == ["run", "run.eqx"]
    np.testing.assert_array_equal(checkpoint.load(path, jnp.zeros(4)), jnp.full(4, 2.0))
    np.testing.assert_array_equal(checkpoint.load(old, jnp.zeros(4)), jnp.full(4, 1.0))
    # Without "run", load("run") must not fall back to the older run.eqx.
    os.remove(path)
    with pytest.raises(ValueError, match="does not exist.*run.eqx"):
        checkpoint.load(path, jnp.zeros(4))


# --------------------------------------------------------------- 4. failed / killed saves


def test_a_failed_save_removes_its_partial_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.eqx"
    checkpoint.save(path, jnp.full(4, 1.0))

    def failing(file, tree):
        file.write(b"half a record")
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.eqx, "tree_serialise_leaves", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(path, jnp.full(4, 2.0))
    assert sorted(os.listdir(tmp_path)) == ["state.eqx"]
    np.testing.assert_array_equal(checkpoint.load(path, jnp.zeros(4)), jnp.full(4, 1.0))


def test_a_stale_partial_is_overwritten(tmp_path):
    path = tmp_path / "state.eqx"
    (tmp_path / "state.eqx.partial").write_bytes(b"x" * 100_000)
    checkpoint.save(path, jnp.full(4, 3.0))
    assert sorted(os.listdir(tmp_path)) == ["state.eqx"]
    np.testing.assert_array_equal(checkpoint.load(path, jnp.zeros(4)), jnp.full(4, 3.0))


_KILLED_SAVER = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from probopt import checkpoint

    path, mode = sys.argv[1], sys.argv[2]
    big = jnp.zeros(1_000_000, jnp.float32)
    checkpoint.save(path, big + 1.0)
    if mode == "pause":
        real = checkpoint.eqx.tree_serialise_leaves

        def pausing(file, tree):
            real(file, tree)  # payload written, header not final, not renamed
            print("mid-save", flush=True)
            time.sleep(120)

        checkpoint.eqx.tree_serialise_leaves = pausing
        checkpoint.save(path, big + 2.0)
    else:
        print("mid-save", flush=True)
        for value in range(2, 10_000):
            checkpoint.save(path, big + value)
    """
)


@pytest.mark.parametrize("mode", ["pause", "loop"])
def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path, mode):
    path = tmp_path / "state.eqx"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVER, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline().strip() == "mid-save"
        if mode == "loop":
            # Wait (briefly) for a save in progress, then kill it.
            for _ in range(2000):
                if os.path.exists(f"{path}.partial"):
                    break
                os.sched_yield()
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stdout.close()
    assert process.returncode == -signal.SIGKILL
    like = jnp.zeros(1_000_000, jnp.float32)
    restored = np.asarray(checkpoint.load(path, like))
    value = restored[0]
    assert value >= 1.0
    np.testing.assert_array_equal(restored, np.full_like(restored, value))
    if mode == "pause":
        assert value == 1.0  # the interrupted save of 2.0 never replaced it
        assert os.path.exists(f"{path}.partial")  # killed mid-save, left behind
    # The next save overwrites any stale .partial and cleans up after itself.
    checkpoint.save(path, like + 7.0)
    assert sorted(os.listdir(tmp_path)) == ["state.eqx"]
    np.testing.assert_array_equal(checkpoint.load(path, like), np.full(1_000_000, 7.0))


# --------------------------------------------------------------- 5. bad paths


def test_save_rejects_bad_paths_naming_them(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    with pytest.raises(ValueError, match="afile.*is a file"):
        checkpoint.save(blocker / "state.eqx", jnp.zeros(2))
    with pytest.raises(ValueError, match="is a directory") as info:
        checkpoint.save(tmp_path, jnp.zeros(2))
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="empty"):
        checkpoint.save("", jnp.zeros(2))
    with pytest.raises(ValueError, match="is a directory"):
        checkpoint.load(tmp_path, jnp.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        checkpoint.load("", jnp.zeros(2))
    with pytest.raises(TypeError, match="path"):
        checkpoint.save(3, jnp.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_save_under_jit_raises_naming_the_path(tmp_path):
    path = tmp_path / "state.eqx"

    @jax.jit
    def step(x):
        checkpoint.save(path, {"x": x})
        return x

    with pytest.raises(TypeError, match=r"state\.eqx.*\['x'\].*tracer"):
        step(jnp.zeros(2))
    assert not os.listdir(tmp_path)
