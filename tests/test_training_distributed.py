"""Sharded training: 8 fake CPU devices vs 1, restore onto another device count, two processes."""

import json
import subprocess
import textwrap

import numpy as np

from tests import runs

# Runs in a subprocess with N fake devices: trains the tiny demo for 2 steps (checkpoint
# at every step, eval of the whole test split at the end), evaluates the step-1 checkpoint
# of `source` (its own, or one saved with another device count), and with a source
# continues that run here for one more step.
_DEVICES_SCRIPT = textwrap.dedent(
    """
    import json, shutil, sys
    import jax
    from absl import logging
    from tests.runs import tiny_config
    from gg_jax import sharding
    from gg_jax.training import evaluation, trainer

    logging.set_verbosity(logging.INFO)

    n, workdir, source = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    assert jax.device_count() == n, jax.devices()
    out = {}
    if n > 1:
      try:
        trainer.train_and_evaluate(tiny_config(batch_size=n + 4), workdir + "_bad")
      except sharding.BatchSizeError as e:
        out["batch_error"] = str(e)
    r = trainer.train_and_evaluate(tiny_config(num_train_steps=2, checkpoint_every_steps=1), workdir)
    out["eval"] = r.eval_metrics
    out["eval_step1"] = evaluation.evaluate(tiny_config(), checkpoint=f"{source or workdir}/checkpoints/1")
    if source:
      shutil.copytree(source, workdir + "_resumed")
      r = trainer.train_and_evaluate(tiny_config(num_train_steps=3, checkpoint_every_steps=1), workdir + "_resumed")
      out["resumed"] = {"step": r.step, "eval": r.eval_metrics}
    print("RESULT " + json.dumps(out))
    """
)


def _run_devices(tmp_path, n, workdir, source=""):
    proc = runs.run(["-c", _DEVICES_SCRIPT, n, workdir, source], runs.subprocess_env(tmp_path, devices=n))
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :]), proc


def test_8_devices_match_1_device_and_checkpoints_restore_onto_another_device_count(tmp_path):
    w8, w1 = tmp_path / "w8", tmp_path / "w1"
    out8, _ = _run_devices(tmp_path, 8, w8)
    out1, proc1 = _run_devices(tmp_path, 1, w1, source=w8)
    assert "config.batch_size=12 is not divisible by the number of devices, 8" in out8["batch_error"]

    # One step on the same global batch. Its forward pass (BatchNorm statistics over the
    # global batch, not per device) is well conditioned: the same running statistics.
    runs.assert_trees_close(
        runs.load_params(w8, 1, "batch_stats"), runs.load_params(w1, 1, "batch_stats"), atol=1e-6, rtol=1e-5
    )
    # Its gradient is not: the 16x16 covariance of a 3x3 map is singular, and the square
    # root's gradient amplifies the 1e-7 differences of two programs' reduction orders into
    # float32 gradients that differ by up to a few % (either program against float64, too).
    # So the updates agree to 10 % of the size of an update (that of step 2), which still
    # fails on a per-device loss or learning rate (8x) or per-device statistics (~100 %).
    p8, p1, p1_next = runs.load_params(w8, 1), runs.load_params(w1, 1), runs.load_params(w1, 2)
    for k in p1:
        update = float(np.max(np.abs(p1_next[k] - p1[k])))
        np.testing.assert_allclose(p8[k], p1[k], atol=0.1 * update + 1e-7, rtol=0, err_msg=f"{k}: update {update}")
    # 360 test digits in 8 batches of 48 (the last one padded): every example counted once.
    assert out8["eval"]["num_examples"] == out1["eval"]["num_examples"] == 360
    # The same (8-device) checkpoint evaluated on 8 devices and restored onto 1 device.
    e8, e1 = out8["eval_step1"], out1["eval_step1"]
    assert e8["num_examples"] == e1["num_examples"] == 360 and e8["step"] == e1["step"] == 1
    # Two programs (8 devices, 1 device): the counts agree but for a near-tie of the top
    # logits, which float32 rounding may decide either way (one example of 360 at most).
    assert abs(e8["top1_error"] - e1["top1_error"]) <= 1.01 / 360, (e8, e1)
    assert abs(e8["top5_error"] - e1["top5_error"]) <= 1.01 / 360, (e8, e1)
    assert abs(e8["loss"] - e1["loss"]) <= 1e-5 * abs(e1["loss"]), (e8, e1)
    # The 8-device run continues on 1 device.
    assert "Restored the checkpoint of step 2" in proc1.stderr
    assert out1["resumed"]["step"] == 3 and out1["resumed"]["eval"]["num_examples"] == 360
    assert runs.checkpoint_steps(str(w1) + "_resumed") == [2, 3]


_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from flax import traverse_util
    from gg_jax.training import distributed_flags, trainer

    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    distributed_flags.initialize_distributed(True, coordinator_address=f"localhost:{port}", num_processes=2,
                                   process_id=pid)
    import jax
    from tests.runs import tiny_config

    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    r = trainer.train_and_evaluate(tiny_config(num_train_steps=3, checkpoint_every_steps=2), workdir)
    flat = traverse_util.flatten_dict(r.state.params, sep="/")
    # Replicated: this process's own copy of every parameter.
    np.savez(f"{workdir}/params_{pid}.npz", **{k: np.asarray(v.addressable_data(0)) for k, v in flat.items()})
    print("RESULT " + json.dumps({"step": r.step, "eval": r.eval_metrics}))
    """
)


def test_two_processes_train_the_demo_and_agree(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    port = runs.free_port()
    env = runs.subprocess_env(tmp_path, devices=1)
    cmds = [runs.command(["-c", _PROCESS_SCRIPT, pid, port, workdir]) for pid in (0, 1)]
    procs = [
        subprocess.Popen(cmd, cwd=runs.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in cmds
    ]
    outs = []
    try:
        for p, cmd in zip(procs, cmds):
            out, err = runs.communicate(p, cmd)
            assert p.returncode == 0, f"process exited {p.returncode}\n{out[-3000:]}\n{err[-8000:]}"
            outs.append(json.loads([s for s in out.splitlines() if s.startswith("RESULT ")][-1][len("RESULT ") :]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert outs[0] == outs[1] and outs[0]["step"] == 3 and outs[0]["eval"]["num_examples"] == 360, outs
    p0, p1 = (dict(np.load(workdir / f"params_{i}.npz")) for i in (0, 1))
    runs.assert_trees_close(p0, p1, atol=0)
    # One checkpoint for both processes, with those parameters.
    assert runs.checkpoint_steps(workdir) == [2, 3]
    runs.assert_trees_close(runs.load_params(workdir, 3), p0, atol=0)
