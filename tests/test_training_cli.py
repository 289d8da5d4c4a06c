"""train.py and evaluate.py on the command line: instant help, one `error:` line per user error.

These runs stop before the trainer is imported (no jax, TensorFlow or Orbax), so each takes
about a second.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

from tests import runs

# What `--help` must not import: the heavy modules behind the trainer.
HEAVY = ("jax", "tensorflow", "orbax", "flax", "clu")


def _run(args, env, timeout=runs.HANG_GUARD_S, prefix=()):
    return runs.run([*args], env, timeout=timeout, check=False, prefix=prefix)


def _imported(stderr: str) -> set:
    """Top-level module names in the `-X importtime` lines of stderr."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def _one_error_line(proc) -> str:
    """The process exited 1 and its stderr is a single `error: ...` line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), runs.tail(proc)
    return lines[0]


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help_is_instant_and_exits_0(tmp_path, script):
    env = runs.subprocess_env(tmp_path)
    # A timeout that a 15 s import would hit, and, whatever the machine's speed, no heavy import.
    proc = _run(["-X", "importtime", script, "--help"], env, timeout=12)
    assert proc.returncode == 0, runs.tail(proc)
    assert "--config" in proc.stdout and "--workdir" in proc.stdout and "--coordinator_address" in proc.stdout
    assert not _imported(proc.stderr) & set(HEAVY), sorted(_imported(proc.stderr) & set(HEAVY))
    full = _run([script, "--helpfull"], env, timeout=12)
    assert full.returncode == 0 and "--coordinator_address" in full.stdout, runs.tail(full)


def test_user_errors_are_one_line_before_anything_is_written(tmp_path):
    env = runs.subprocess_env(tmp_path)
    work = tmp_path / "w"
    # A workdir holding a checkpoint: a refused config must not touch it.
    (work / "checkpoints" / "5").mkdir(parents=True)
    (work / "checkpoints" / "5" / "file").write_text("saved")
    train = ["train.py", "--config=configs/demo.py", f"--workdir={work}"]

    line = _one_error_line(_run([*train, "--config.learning_rat=0.1"], env))
    assert "--config.learning_rat" in line and 'Did you mean "learning_rate"' in line, line
    line = _one_error_line(_run([*train, "--config.model.num_blockz=2"], env))
    assert 'Did you mean "num_blocks"' in line, line
    line = _one_error_line(_run([*train, "--config.batch_size=abc"], env))
    assert "--config.batch_size=abc" in line, line
    line = _one_error_line(_run(["train.py", "--config=configs/nope.py", f"--workdir={work}"], env))
    assert "configs/nope.py" in line and "No such file" in line, line
    # Config files that do not load: the file and the line, in one line.
    for source, expected in (
        ("def get_config(:\n    pass\n", ", line 1: SyntaxError: invalid syntax"),
        ("X = 1\n", "the file has no get_config() function"),
        ("def get_config():\n    raise ValueError('no data dir')\n", ", line 2: ValueError: no data dir"),
    ):
        path = tmp_path / f"config_{len(source)}.py"
        path.write_text(source)
        line = _one_error_line(_run(["train.py", f"--config={path}", f"--workdir={work}"], env))
        assert f"cannot load --config={path}" in line and expected in line, line

    # Model options out of range and an image size that leaves a 1x1 map, named in one line
    # before any model is built.
    bad = ["reduction_dim=-5", "num_blocks=-1", "num_iters=0", "lam=2.0", "dropout_rate=1.5"]
    line = _one_error_line(_run([*train, *(f"--config.model.{o}" for o in bad), "--config.image_size=16"], env))
    for option in bad:
        assert f"{option} must be" in line, line
    assert "config.image_size=16 leaves resnet18_3g a 1x1 last feature map" in line and ">= 17" in line, line
    # A baseline is a flag away; an option only the 3G head takes is named, with how to unset it.
    line = _one_error_line(_run([*train, "--config.model.name=resnet18_isqrt", "--config.num_epochs=0"], env))
    assert "Unknown option(s) ['num_blocks'] for model 'resnet18_isqrt'" in line, line
    assert "--config.model.num_blocks=None" in line, line

    # The model options of configs/default.py parse (docs/training.md shows dropout_rate);
    # keep_checkpoints=0 is refused (Orbax would delete every checkpoint, the last one too).
    options = ["dropout_rate=0.2", "last_stride=2", "reweighting=urm_v1", "lam=0.5", "estimator=False"]
    options += ["sqrt_method=eigh", "hidden=32"]
    line = _one_error_line(
        _run([*train, *(f"--config.model.{o}" for o in options), "--config.keep_checkpoints=0"], env)
    )
    assert "config.keep_checkpoints=0 must be >= 1" in line, line
    line = _one_error_line(_run([*train, "--config.num_train_steps=0", "--config.num_epochs=0"], env))
    assert "nothing to train" in line, line
    line = _one_error_line(
        _run([*train, "--config.learning_rate=-0.1", "--config.dataset.augment=mixup", "--config.batch_size=0"], env)
    )
    for field in ("learning_rate=-0.1", "augment='mixup'", "batch_size=0"):
        assert field in line, line
    assert sorted(p.name for p in work.rglob("*")) == ["5", "checkpoints", "file"]
    assert (work / "checkpoints" / "5" / "file").read_text() == "saved"


def _read_only_dir(tmp_path) -> tuple[pathlib.Path, tuple]:
    """A directory that this user cannot write into, and a command prefix that makes it so:
    a chmod for an ordinary user; for root (whom permissions do not stop), a read-only
    tmpfs mounted there in a private mount namespace (`unshare`), if this system allows it."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        return path, ()
    unshare = shutil.which("unshare")
    probe = subprocess.run(
        [unshare or "unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {path} && ! touch {path}/x"],
        capture_output=True,
        timeout=60,
    )
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"running as root and cannot mount a read-only tmpfs with unshare: {probe.stderr[-300:]!r}")
    return path, (unshare, "-rm", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {path} && exec "$0" "$@"')


def test_a_read_only_workdir_is_one_line_before_training(tmp_path):
    env = runs.subprocess_env(tmp_path)
    path, prefix = _read_only_dir(tmp_path)
    for args in (
        ["train.py", "--config=configs/demo.py", f"--workdir={path}"],
        ["evaluate.py", "--config=configs/demo.py", f"--workdir={path}"],
    ):
        line = _one_error_line(_run(args, env, prefix=prefix))
        assert f"Cannot write to the workdir {path}" in line, line
