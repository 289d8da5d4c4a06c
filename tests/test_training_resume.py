"""Checkpoints that survive: kill -9 and resume, SIGTERM (twice), a full disk, a save failing in
the background, a damaged checkpoint, NaN, finished runs, a wrong workdir."""

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from gg_jax import checkpoints
from gg_jax.training import trainer
from tests import runs


def _train_cmd(workdir, **overrides):
    return ["train.py", "--config=configs/demo.py", f"--workdir={workdir}", *runs.flags({**runs.TINY, **overrides})]


def _start(args, env, **kwargs):
    return subprocess.Popen(
        runs.command(args),
        cwd=runs.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _wait_for_checkpoint(proc, workdir, timeout=runs.HANG_GUARD_S):
    deadline = time.time() + timeout
    while not runs.checkpoint_steps(workdir):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"training exited ({proc.returncode}) before its first checkpoint\n{out[-3000:]}\n{err[-6000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"no checkpoint within {timeout} s (a hang guard)\n{out[-3000:]}\n{err[-6000:]}")
        time.sleep(0.02)


def _error_line(err: str) -> str:
    """The last line of stderr, which must be train.py's one `error:` line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err[-6000:]
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in err, err[-6000:]
    return lines[-1]


def _tmp_dirs(workdir):
    return sorted(p.name for p in (workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    env = runs.subprocess_env(tmp_path)
    total = 10
    overrides = dict(num_train_steps=total, checkpoint_every_steps=2)
    ref = tmp_path / "uninterrupted"
    runs.run(_train_cmd(ref, **overrides), env)
    assert runs.checkpoint_steps(ref)[-1] == total

    work = tmp_path / "killed"
    proc = _start(_train_cmd(work, **overrides), env)
    _wait_for_checkpoint(proc, work)
    proc.kill()  # SIGKILL: no handler runs, an async save may be cut in the middle.
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    saved = runs.checkpoint_steps(work)
    assert saved and saved[-1] < total, saved

    resumed = runs.run(_train_cmd(work, **overrides), env)
    assert f"Restored the checkpoint of step {saved[-1]}" in resumed.stderr, runs.tail(resumed)
    assert f"from step {saved[-1]}." in resumed.stderr
    assert runs.checkpoint_steps(work)[-1] == total
    # Same data order, same dropout/init keys, optimizer state restored: the same parameters.
    runs.assert_trees_close(runs.load_params(work, total), runs.load_params(ref, total), atol=1e-6)


def test_sigterm_and_ctrl_c_commit_the_checkpoint_despite_a_second_signal_then_resume(tmp_path):
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C) save the current step and exit with 128 +
    the signal once the checkpoint is committed, without a traceback; a second signal during the
    save (sent 0.05 or 0.6 s after the first) is ignored."""
    env = runs.subprocess_env(tmp_path)
    overrides = dict(num_train_steps=100_000, checkpoint_every_steps=3, keep_checkpoints=2)
    stopped = {}
    for sig, delay in ((signal.SIGTERM, 0.05), (signal.SIGINT, 0.6)):
        work = tmp_path / f"w{delay}"
        cmd = _train_cmd(work, **overrides)
        proc = _start(cmd, env)
        _wait_for_checkpoint(proc, work)  # Training, past its first checkpoint.
        first = runs.checkpoint_steps(work)[0]
        proc.send_signal(sig)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(sig)
        out, err = runs.communicate(proc, cmd)
        assert proc.returncode == 128 + sig, f"{sig.name}, delay {delay}: exit {proc.returncode}\n{err[-6000:]}"
        assert f"Stopped by {sig.name}: saved the checkpoint of step" in err, err[-6000:]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-6000:]
        step = int(err.split(": saved the checkpoint of step ")[1].split(" ")[0])
        steps = runs.checkpoint_steps(work)
        # Committed: the step's directory, no temporary one, and its parameters read back.
        assert step >= first and steps[-1] == step and len(steps) <= 2 and not _tmp_dirs(work), (delay, step, steps)
        assert all(np.isfinite(v).all() for v in runs.load_params(work, step).values())
        stopped[delay] = (work, step)

    # The same workdir, more steps: continues from the preemption checkpoint.
    work, step = stopped[0.6]
    more = runs.run(_train_cmd(work, num_train_steps=step + 2, checkpoint_every_steps=3, keep_checkpoints=2), env)
    assert f"Restored the checkpoint of step {step}" in more.stderr, runs.tail(more)
    assert runs.checkpoint_steps(work)[-1] == step + 2
    # Finished: nothing is trained or written again.
    mtime = (work / "checkpoints" / str(step + 2)).stat().st_mtime
    again = runs.run(_train_cmd(work, num_train_steps=step + 2, checkpoint_every_steps=3, keep_checkpoints=2), env)
    assert "is finished" in again.stderr and "Training resnet18_3g" not in again.stderr, runs.tail(again)
    assert runs.checkpoint_steps(work)[-1] == step + 2
    assert (work / "checkpoints" / str(step + 2)).stat().st_mtime == mtime


def _tmpfs_prefix(mount_point, size: str):
    """A command prefix that runs the command with a `size` tmpfs mounted at `mount_point`
    (a private mount namespace, `unshare -rm`), then lists what is left there; None where
    this system does not allow it (no unshare, unprivileged user namespaces off)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    mount = f"mount -t tmpfs -o size={size} tmpfs {mount_point}"
    probe = subprocess.run([unshare, "-rm", "sh", "-c", mount], capture_output=True, timeout=60)
    if probe.returncode != 0:
        return None
    script = f'{mount} && "$0" "$@"; rc=$?; echo LEFT: $(ls {mount_point}/checkpoints); exit $rc'
    return (unshare, "-rm", "sh", "-c", script)


def test_a_full_disk_stops_at_the_first_failed_save_with_one_line(tmp_path):
    """A checkpoint takes 80-90 MB: on a 120 MB file system the first save fits, the second
    does not. It is refused before it starts; the first checkpoint stays."""
    work = tmp_path / "w"
    work.mkdir()
    prefix = _tmpfs_prefix(work, "120m")
    if prefix is None:
        pytest.skip("cannot mount a small tmpfs here (needs `unshare -rm` and unprivileged user namespaces)")
    proc = runs.run(
        _train_cmd(work, num_train_steps=6, checkpoint_every_steps=2),
        runs.subprocess_env(tmp_path),
        check=False,
        prefix=prefix,
    )
    assert proc.returncode == 1, runs.tail(proc)
    line = _error_line(proc.stderr)
    assert "Could not save the checkpoint of step 4" in line and "No space left on device" in line, line
    assert "The checkpoint of step 2 is the latest complete one (kept)" in line, line
    assert "LEFT: 2" in proc.stdout, runs.tail(proc)  # Step 2 only, no temporary directory.


def test_a_save_failing_in_the_background_stops_the_run_with_one_line(tmp_path):
    """The first save fails while being written (files above 8 MiB refused: RLIMIT_FSIZE, which
    any user may lower): the run stops at the next step with one line, exit status 1."""
    if not hasattr(resource, "RLIMIT_FSIZE") or not hasattr(signal, "SIGXFSZ"):
        pytest.skip("needs RLIMIT_FSIZE and SIGXFSZ (POSIX)")

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes past the limit fail with EFBIG instead.
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    work = tmp_path / "w"
    cmd = _train_cmd(work, num_train_steps=20, checkpoint_every_steps=2)
    proc = _start(cmd, runs.subprocess_env(tmp_path), preexec_fn=limit_file_size)
    out, err = runs.communicate(proc, cmd)
    assert proc.returncode == 1, err[-6000:]
    line = _error_line(err)
    assert "Could not save the checkpoint of step 2" in line and "File too large" in line, line
    assert "No checkpoint was completed before" in line, line
    assert runs.checkpoint_steps(work) == [], err[-3000:]
    # It stopped right after the failure was known, long before step 20.
    assert "Step 10 of 20" not in err, err[-6000:]


def _file_digests(directory) -> dict:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_nan_wrong_workdir_and_damaged_checkpoint_keep_every_good_checkpoint(tmp_path):
    work = tmp_path / "w"
    good = trainer.train_and_evaluate(runs.tiny_config(num_train_steps=2, checkpoint_every_steps=1), str(work))
    assert good.step == 2 and runs.checkpoint_steps(work) == [1, 2]
    before = runs.load_params(work, 2)

    # A finished run returns at once, without training.
    again = trainer.train_and_evaluate(runs.tiny_config(num_train_steps=2, checkpoint_every_steps=1), str(work))
    assert again.step == 2 and again.eval_metrics is None

    # Continue with an infinite learning rate: the parameters of step 3 are inf/NaN, so the
    # loss of step 4 is NaN; the only checkpoint due is the final one, which must not be written.
    diverging = runs.tiny_config(num_train_steps=8, checkpoint_every_steps=-1, learning_rate=float("inf"))
    with pytest.raises(trainer.NonFiniteLossError, match=r"NaN/inf by step 4\..*last good checkpoint, step 2"):
        trainer.train_and_evaluate(diverging, str(work))
    assert runs.checkpoint_steps(work) == [1, 2]
    runs.assert_trees_close(runs.load_params(work, 2), before, atol=0)

    # A workdir holding another model, or trained with another batch size, is refused
    # before anything is changed.
    for other in (dict(model__reduction_dim=8), dict(model__name="resnet18_isqrt", model__num_blocks=None)):
        with pytest.raises(checkpoints.WorkdirMismatchError, match="holds checkpoints of resnet18_3g"):
            trainer.train_and_evaluate(runs.tiny_config(num_train_steps=4, **other), str(work))
    with pytest.raises(
        checkpoints.WorkdirMismatchError, match=r"global batch of 16, .* asks for 32\..*--config.batch_size=16"
    ):
        trainer.train_and_evaluate(runs.tiny_config(num_train_steps=4, batch_size=32), str(work))
    assert runs.checkpoint_steps(work) == [1, 2]
    assert all(np.isfinite(v).all() for v in runs.load_params(work, 2).values())

    # The latest checkpoint damaged (half of its largest file lost): named, with what to move
    # where; nothing changed.
    latest = work / "checkpoints" / "2"
    largest = max((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    digests = _file_digests(latest)
    with pytest.raises(
        checkpoints.DamagedCheckpointError,
        match=rf"step 2, is damaged .*Nothing was changed\. Move {latest} out of .*resumes from step 1,",
    ):
        trainer.train_and_evaluate(runs.tiny_config(num_train_steps=3), str(work))
    assert runs.checkpoint_steps(work) == [1, 2] and _file_digests(latest) == digests
    # Moved away as the message says, the run resumes from step 1 and saves step 2 afresh.
    os.rename(latest, work / "damaged_checkpoint_2")
    resumed = trainer.train_and_evaluate(runs.tiny_config(num_train_steps=2, checkpoint_every_steps=1), str(work))
    assert resumed.step == 2 and runs.checkpoint_steps(work) == [1, 2]
    runs.assert_trees_close(runs.load_params(work, 2), before, atol=1e-6)  # The same run.
    assert _file_digests(work / "damaged_checkpoint_2") == digests
