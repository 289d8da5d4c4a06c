"""Training runs for the tests: the tiny demo config, subprocesses of the entry points, checkpoints.

Training runs use the demo's ResNet-18 3G-Net with 16 reduced channels on batches of 16
48x48 digits, so that a step compiles and runs in seconds on a CPU (smaller images are no
cheaper: XLA:CPU is pathologically slow on the 2x2 maps of 32x32 inputs). Subprocesses
run the real entry points (`train.py`, `evaluate.py`) from the repository root and
share a persistent XLA compilation cache, so the same step is compiled once per session.
"""

import importlib
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tiny demo: overrides of configs/demo.py (as --config.FIELD=VALUE flags or config fields).
TINY = {
    "model.reduction_dim": 16,
    "batch_size": 16,
    "num_train_steps": 2,  # Tests set more where they need them; never the demo's epochs.
    "eval.batch_size": 48,
    "log_every_steps": 1,
    "eval_every_steps": -1,
    "checkpoint_every_steps": -1,
    "warmup_epochs": 0.0,
}


# The recipes of configs/ as they are, but the tiny ResNet-18 3G-Net, small images and batches.
SMALL = {
    "model.name": "resnet18_3g",
    "model.reduction_dim": 16,
    "model.num_blocks": 1,
    "image_size": 48,
    "dataset.train_resize_size": 56,
    "eval.resize_size": 56,
    "batch_size": 4,
    "eval.batch_size": 4,
    "num_train_steps": 2,
    "log_every_steps": 1,
    "checkpoint_every_steps": -1,
}


def small_config(name: str, **overrides):
    """configs/NAME.py with SMALL and `overrides` ('a__b' or 'a.b' keys) applied."""
    return _apply(importlib.import_module(f"configs.{name}").get_config(), {**SMALL, **_keys(overrides)})


def pretrained(path, seed: int = 123) -> dict:
    """Writes 'ImageNet' variables of the tiny model (10 classes) to `path` as the converter
    does (a variables directory); returns them."""
    import jax

    from gg_jax import checkpoints, models

    model = models.create("resnet18_3g", num_classes=10, reduction_dim=16, num_blocks=1)
    variables = jax.tree.map(np.asarray, models.init_variables(model, jax.random.PRNGKey(seed)))
    checkpoints.save_variables(str(path), variables, {"model": "resnet18_3g", "num_classes": 10})
    return variables


def flags(overrides: dict) -> list:
    """{'a.b': v} -> ['--config.a.b=v']."""
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def _keys(overrides: dict) -> dict:
    return {k.replace("__", "."): v for k, v in overrides.items()}


def _apply(config, overrides: dict):
    for key, value in overrides.items():
        node, *rest = key.split(".")
        target = config
        while rest:
            target, node, rest = target[node], rest[0], rest[1:]
        target[node] = value
    return config


def tiny_config(name: str = "demo", **overrides):
    """configs/NAME.py with TINY and `overrides` ('a__b' or 'a.b' keys) applied."""
    return _apply(importlib.import_module(f"configs.{name}").get_config(), {**TINY, **_keys(overrides)})


def subprocess_env(tmp_path, devices: int = 1, **extra) -> dict:
    """CPU-only JAX with `devices` fake devices and a compilation cache shared by the tests
    of this pytest worker (in its base temporary directory, the parent of `tmp_path`)."""
    cache = pathlib.Path(tmp_path).parent / "jax_cache"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def without_tensorflow(env: dict, tmp_path) -> dict:
    """`env` with a `tensorflow` package first on PYTHONPATH that raises ImportError: the
    subprocess runs as on a host where TensorFlow is not installed."""
    blocker = pathlib.Path(tmp_path) / "no_tensorflow" / "tensorflow"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError('TensorFlow is not installed here')\n")
    return {**env, "PYTHONPATH": os.pathsep.join([str(blocker.parent), env.get("PYTHONPATH", "")])}


# Time limits of subprocesses are hang guards, not speed checks: a busy 2-core machine ran
# the suite in 57 minutes (10 when idle) and CI allows 90, so one command may take long.
HANG_GUARD_S = 2400


def command(args, prefix=()) -> list:
    """`[*prefix, python, *args]`, as strings."""
    return [*map(str, prefix), sys.executable, *map(str, args)]


def run(args, env, timeout=HANG_GUARD_S, check=True, prefix=()) -> subprocess.CompletedProcess:
    """Runs `python ARGS...` (after `prefix`, e.g. a namespace wrapper) in the repository root;
    asserts success if `check`. A run past `timeout` fails with the command and its output."""
    cmd = command(args, prefix)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(timed_out(cmd, timeout, e.stdout, e.stderr)) from None
    if check:
        assert proc.returncode == 0, f"{shlex.join(cmd)} exited {proc.returncode}\n{tail(proc)}"
    return proc


def communicate(proc: subprocess.Popen, cmd, timeout=HANG_GUARD_S) -> tuple[str, str]:
    """`proc.communicate(timeout=...)`; past the timeout, kills it and fails with the command
    and its output."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(timed_out(cmd, timeout, out, err)) from None


def timed_out(cmd, timeout, stdout, stderr, n=6000) -> str:
    def text(x):
        return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")

    return (
        f"Timed out after {timeout} s (a hang guard): {shlex.join(map(str, cmd))}\n"
        f"--- stdout\n{text(stdout)[-n:]}\n--- stderr\n{text(stderr)[-n:]}"
    )


def tail(proc, n=6000) -> str:
    return f"--- stdout\n{proc.stdout[-n:]}\n--- stderr\n{proc.stderr[-n:]}"


def last_json(text: str) -> dict:
    """The last line of `text` that is a JSON object (what evaluate.py prints)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{text[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def checkpoint_steps(workdir) -> list:
    """Finished checkpoint steps in WORKDIR/checkpoints (Orbax names them by step)."""
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def load_params(workdir, step=None, collection: str = "params") -> dict:
    """Flat {'a/b/kernel': array} of the params (or another collection, e.g. 'batch_stats')
    of a training checkpoint (host arrays)."""
    import orbax.checkpoint as ocp
    from flax import traverse_util

    step = max(checkpoint_steps(workdir)) if step is None else step
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "variables"
    with ocp.PyTreeCheckpointer() as ckptr:
        # NumPy arrays, whatever devices saved them.
        meta = ckptr.metadata(path).item_metadata.tree
        tree = ckptr.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta))
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree[collection], sep="/").items()}


def flat(tree) -> dict:
    """{'a/b/kernel': array} of a nested dict of arrays."""
    from flax import traverse_util

    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def assert_trees_close(a: dict, b: dict, atol, rtol=0.0):
    assert sorted(a) == sorted(b)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=rtol, err_msg=f"{k} (worst abs diff {worst})")


def read_scalars(workdir) -> dict:
    """{tag: {step: value}} from the TensorBoard event files of `workdir`."""
    from tensorboard.backend.event_processing import event_accumulator

    out = {}
    for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.TENSORS: 0})
        acc.Reload()
        for tag in acc.Tags().get("tensors", []):
            for ev in acc.Tensors(tag):
                out.setdefault(tag, {})[ev.step] = float(np.asarray(_tensor_value(ev.tensor_proto)).reshape(-1)[0])
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                out.setdefault(tag, {})[ev.step] = float(ev.value)
    return out


def _tensor_value(proto):
    from tensorboard.util import tensor_util

    return tensor_util.make_ndarray(proto)
