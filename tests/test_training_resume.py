"""Checkpoints that survive preemption: kill -9 and resume, SIGTERM, NaN, finished runs, wrong workdir."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import test_training_common as common

from gg_jax.training import trainer

pytest.importorskip("tensorflow")


def _train_cmd(workdir, **overrides):
    return ["train.py", "--config=configs/demo.py", f"--workdir={workdir}", *common.flags({**common.TINY, **overrides})]


def _start(args, env):
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=common.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_checkpoint(proc, workdir, timeout=240):
    deadline = time.time() + timeout
    while not common.checkpoint_steps(workdir):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"training exited ({proc.returncode}) before its first checkpoint\n{out[-3000:]}\n{err[-6000:]}"
            )
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    env = common.subprocess_env(tmp_path)
    total = 10
    overrides = dict(num_train_steps=total, checkpoint_every_steps=2)
    ref = tmp_path / "uninterrupted"
    common.run(_train_cmd(ref, **overrides), env)
    assert common.checkpoint_steps(ref)[-1] == total

    work = tmp_path / "killed"
    proc = _start(_train_cmd(work, **overrides), env)
    _wait_for_checkpoint(proc, work)
    proc.kill()  # SIGKILL: no handler runs, an async save may be cut in the middle.
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    saved = common.checkpoint_steps(work)
    assert saved and saved[-1] < total, saved

    resumed = common.run(_train_cmd(work, **overrides), env)
    assert f"Restored the checkpoint of step {saved[-1]}" in resumed.stderr, common.tail(resumed)
    assert f"from step {saved[-1]}." in resumed.stderr
    assert common.checkpoint_steps(work)[-1] == total
    # Same data order, same dropout/init keys, optimizer state restored: the same parameters.
    common.assert_trees_close(common.load_params(work, total), common.load_params(ref, total), atol=1e-6)


def test_sigterm_saves_and_exits_then_resumes_and_a_finished_run_does_not_retrain(tmp_path):
    env = common.subprocess_env(tmp_path)
    work = tmp_path / "w"
    proc = _start(_train_cmd(work, num_train_steps=100_000, checkpoint_every_steps=3, keep_checkpoints=2), env)
    _wait_for_checkpoint(proc, work)
    first = common.checkpoint_steps(work)[0]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, f"{out[-3000:]}\n{err[-6000:]}"
    assert "Preempted: saved the checkpoint of step" in err
    stopped = int(err.split("Preempted: saved the checkpoint of step ")[1].split(" ")[0])
    steps = common.checkpoint_steps(work)
    assert stopped >= first and steps[-1] == stopped and len(steps) <= 2, (first, stopped, steps)

    # Same workdir, more steps: continues from the preemption checkpoint.
    more = common.run(_train_cmd(work, num_train_steps=stopped + 2, checkpoint_every_steps=3, keep_checkpoints=2), env)
    assert f"Restored the checkpoint of step {stopped}" in more.stderr, common.tail(more)
    assert common.checkpoint_steps(work)[-1] == stopped + 2
    # Finished: nothing is trained or written again.
    mtime = (work / "checkpoints" / str(stopped + 2)).stat().st_mtime
    again = common.run(_train_cmd(work, num_train_steps=stopped + 2, checkpoint_every_steps=3, keep_checkpoints=2), env)
    assert "is finished" in again.stderr and "Training resnet18_3g" not in again.stderr, common.tail(again)
    assert common.checkpoint_steps(work)[-1] == stopped + 2
    assert (work / "checkpoints" / str(stopped + 2)).stat().st_mtime == mtime


def test_nan_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
    work = str(tmp_path / "w")
    good = trainer.train_and_evaluate(common.tiny_config(num_train_steps=2, checkpoint_every_steps=1), work)
    assert good.step == 2 and common.checkpoint_steps(work) == [1, 2]
    before = common.load_params(work, 2)

    # A finished run returns at once, without training.
    again = trainer.train_and_evaluate(common.tiny_config(num_train_steps=2, checkpoint_every_steps=1), work)
    assert again.step == 2 and again.eval_metrics is None

    # Continue with an infinite learning rate: the parameters of step 3 are inf/NaN, so the
    # loss of step 4 is NaN; the only checkpoint due is the final one, which must not be written.
    diverging = common.tiny_config(num_train_steps=8, checkpoint_every_steps=-1, learning_rate=float("inf"))
    with pytest.raises(trainer.NonFiniteLossError, match=r"NaN/inf by step 4\..*last good checkpoint, step 2"):
        trainer.train_and_evaluate(diverging, work)
    assert common.checkpoint_steps(work) == [1, 2]
    common.assert_trees_close(common.load_params(work, 2), before, atol=0)

    # A workdir holding another model is refused before anything is changed.
    for other in (dict(model__reduction_dim=8), dict(model__name="resnet18_isqrt")):
        with pytest.raises(trainer.checkpointing.WorkdirMismatchError, match="holds checkpoints of resnet18_3g"):
            trainer.train_and_evaluate(common.tiny_config(num_train_steps=4, **other), work)
    assert common.checkpoint_steps(work) == [1, 2]
    assert all(np.isfinite(v).all() for v in common.load_params(work, 2).values())
