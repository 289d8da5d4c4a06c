"""`gg_jax.checkpoints.load`: any gg_jax checkpoint (converted variables or a training run) as a
model, and `run_config`: the config of the run a checkpoint belongs to."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from gg_jax import checkpoints, models
from gg_jax.backbones import blocks
from gg_jax.training import trainer
from tests import runs


def _fields(module) -> dict:
    """A model's configuration: its fields, those that are modules by their own fields."""
    out = {}
    for name in blocks.module_options(type(module)):
        value = getattr(module, name)
        out[name] = (type(value), _fields(value)) if isinstance(value, nn.Module) else value
    return out


def _assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_load_reads_variables_dirs_and_training_runs(tmp_path, tiny_run):
    # A variables directory, as the converter writes it.
    model = models.create("resnet18_isqrt", num_classes=7, reduction_dim=8)
    variables = jax.device_get(models.init_variables(model, jax.random.PRNGKey(1)))
    meta = {"model": "resnet18_isqrt", "num_classes": 7, "model_options": {"reduction_dim": 8}}
    checkpoints.save_variables(str(tmp_path / "converted"), variables, meta)
    loaded_model, loaded, loaded_meta = checkpoints.load(str(tmp_path / "converted"))
    assert _fields(loaded_model) == _fields(model) and loaded_meta["num_classes"] == 7
    _assert_trees_equal(loaded, variables)
    assert checkpoints.run_config(str(tmp_path / "converted")) is None
    with pytest.raises(checkpoints.CheckpointExistsError, match="--overwrite"):
        checkpoints.save_variables(str(tmp_path / "converted"), variables, meta)

    # Options that change no shape apply over the checkpoint's; others make it not fit.
    precise, _, _ = checkpoints.load(str(tmp_path / "converted"), matmul_precision="highest", num_iters=7)
    assert (precise.head.matmul_precision, precise.head.num_iters) == ("highest", 7)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"layer_reduce/kernel: checkpoint \(1, 1, 512, 8\)"):
        checkpoints.load(str(tmp_path / "converted"), reduction_dim=16)
    with pytest.raises(checkpoints.CheckpointMismatchError, match="holds resnet18_isqrt .* resnet18_3g was asked"):
        checkpoints.load(str(tmp_path / "converted"), name="resnet18_3g")

    # A training workdir (its latest step), its checkpoints/ directory and one step directory.
    workdir, result = tiny_run
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "1"):
        loaded_model, loaded, loaded_meta = checkpoints.load(str(path))
        assert loaded_meta["model"] == "resnet18_3g" and loaded_meta["step"] == 1
        assert _fields(loaded_model) == _fields(trainer.create_model(runs.tiny_config(), 10))
        _assert_trees_equal(loaded, jax.device_get(result.state.variables))
        assert checkpoints.run_config(str(path)) == json.loads((workdir / "config.json").read_text())

    with pytest.raises(checkpoints.CheckpointNotFoundError, match="holds no gg_jax checkpoint"):
        checkpoints.load(str(tmp_path))


def test_a_run_resumes_after_options_that_change_no_shape(tmp_path, tiny_run, caplog):
    """Moving a run to another precision or iteration count resumes it with one log line; another
    model or other variable shapes are refused before anything is changed."""
    source, _ = tiny_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    with pytest.raises(checkpoints.WorkdirMismatchError, match="holds checkpoints of resnet18_3g"):
        trainer.train_and_evaluate(runs.tiny_config(num_train_steps=2, model__reduction_dim=8), str(workdir))
    with pytest.raises(checkpoints.WorkdirMismatchError, match="image size 48, but the config asks for 64"):
        trainer.train_and_evaluate(runs.tiny_config(num_train_steps=2, image_size=64), str(workdir))
    assert runs.checkpoint_steps(workdir) == [1]
    caplog.set_level("INFO")
    changed = runs.tiny_config(num_train_steps=2, model__num_iters=4, model__matmul_precision="highest")
    result = trainer.train_and_evaluate(changed, str(workdir))
    assert result.step == 2 and runs.checkpoint_steps(workdir) == [1, 2]
    assert "matmul_precision (default) -> 'highest', num_iters (default) -> 4" in caplog.text


_HOLD = """
import sys
from gg_jax import checkpoints
with checkpoints.claim_workdir(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_one_run_per_workdir_a_lock_on_disks(tmp_path, caplog):
    """A second run is refused in one line naming the holder; the claim of a process that died
    is taken over with a log line; the claim file goes when the run ends."""
    import socket
    import subprocess

    workdir = tmp_path / "w"
    workdir.mkdir()
    holder = subprocess.Popen(
        runs.command(["-c", _HOLD, workdir]), cwd=runs.REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"{workdir} is in use by another training run \(host {socket.gethostname()}, pid {holder.pid}, since"
        with pytest.raises(checkpoints.WorkdirBusyError, match=busy):
            with checkpoints.claim_workdir(str(workdir)):
                pass
        # The trainer claims the workdir before it reads or writes anything there.
        with pytest.raises(checkpoints.WorkdirBusyError, match=busy):
            trainer.train_and_evaluate(runs.tiny_config(), str(workdir))
        assert sorted(p.name for p in workdir.iterdir()) == [".gg_jax_claim"]
    finally:
        holder.kill()  # Dies holding the claim: the kernel releases the lock, the file stays.
        holder.wait()
    caplog.set_level("WARNING")
    with checkpoints.claim_workdir(str(workdir)):
        assert f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (workdir / ".gg_jax_claim").exists()


def test_one_run_per_workdir_a_lease_on_object_stores(tmp_path, caplog):
    """The claim where files cannot be locked (gs://): a lease that its holder renews, taken over
    once it has expired."""
    import time

    from gg_jax.checkpoints import claim

    path = tmp_path / claim.CLAIM_FILE
    path.write_text(json.dumps({"host": "h", "pid": 7, "since": "then", "expires": time.time() + 60}))
    with pytest.raises(checkpoints.WorkdirBusyError, match=r"host h, pid 7, since then"):
        with checkpoints.claim_workdir(str(tmp_path), lease_seconds=1.0):
            pass
    path.write_text(json.dumps({"host": "h", "pid": 7, "since": "then", "expires": time.time() - 1}))
    caplog.set_level("WARNING")
    with checkpoints.claim_workdir(str(tmp_path), lease_seconds=0.6):
        assert "Taking over the lease" in caplog.text
        first = json.loads(path.read_text())["expires"]
        time.sleep(0.5)  # Renewed every 0.2 s.
        assert json.loads(path.read_text())["expires"] > first
    assert not path.exists()
