"""gg_jax.export: a trained model as a jax.export artifact, called without gg_jax.

A tiny 3G-Net trained for one step (the `tiny_run` fixture of conftest.py). The command
line (run in this process) exports it for pixel input, lowered for CPU, CUDA and TPU; the
function exports it for normalised input from one checkpoints/<step> directory. Both
artifacts run in a fresh Python that imports only jax and NumPy, on the digits eval
images as the eval pipeline makes them. Their logits are those of the checkpoint's
eval-mode model (as evaluate.py builds it), and the loss and top-1 error over the eval
split are those of the run's own evaluation. The artifacts and the reference compile at XLA
backend optimisation level 0: compile time is the cost of this test.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gg_jax import checkpoints, data, export
from gg_jax.errors import UserError
from tests import runs

FAST_FLAGS = "--xla_backend_optimization_level=0"
FAST_COMPILE = {"xla_backend_optimization_level": 0}

CONSUMER = r"""
import sys

import jax
import numpy as np

directory = sys.argv[1]


def load(name):
    with open(f"{directory}/{name}", "rb") as f:
        return jax.export.deserialize(f.read())


images = np.load(f"{directory}/images.npz")
normalized, pixels = load("normalized.jax"), load("pixels.jax")
out = {
    # The symbolic batch dimension at three sizes; the whole split in batches of 8.
    "b1": np.asarray(normalized.call(images["normalized"][:1])),
    "b3": np.asarray(normalized.call(images["normalized"][1:4])),
    "normalized": np.concatenate([np.asarray(normalized.call(x)) for x in np.split(images["normalized"], 45)]),
    "pixels": np.asarray(pixels.call(images["pixels"][:8])),
}
np.savez(f"{directory}/logits.npz", **out)
assert pixels.platforms == ("cpu", "cuda", "tpu"), pixels.platforms
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("gg_jax", "flax"))
assert not leaked, leaked
print("consumer ok")
"""


def test_export_round_trip_gives_the_evaluated_models_logits(tmp_path, capsys, tiny_run):
    # One train step of the demo model (final evaluation included). The consumer and the
    # reference compile at backend optimisation level 0 (compile time is the cost of this
    # test; XLA:CPU otherwise spends most of it optimising random-number code).
    workdir, _ = tiny_run
    env = runs.subprocess_env(tmp_path, XLA_FLAGS=f"{FAST_FLAGS} --xla_force_host_platform_device_count=1")
    evaluated = {k: v[1] for k, v in runs.read_scalars(workdir).items() if k.startswith("eval/")}
    out = tmp_path / "artifacts"

    # The command line (in this process): pixel input (the default), three platforms, the
    # image size of the run.
    cli = [f"--checkpoint={workdir}", f"--out={out / 'pixels.jax'}", "--platforms=cpu,cuda,tpu"]
    assert export.main(cli) == 0
    assert "Exported resnet18_3g (10 classes, step 1)" in capsys.readouterr().out
    sidecar = json.loads((out / "pixels.jax.json").read_text())
    assert sidecar["image_size"] == 48 and sidecar["num_classes"] == 10 and sidecar["step"] == 1
    assert sidecar["platforms"] == ["cpu", "cuda", "tpu"] and sidecar["input"]["convention"] == "pixels"
    assert sidecar["input"]["shape"] == ["batch", 48, 48, 3] and sidecar["output"]["shape"] == ["batch", 10]
    assert sidecar["eval_preprocessing"].startswith("the whole image resized to 48 x 48")

    # The function, from one step directory, normalised input, over an existing file.
    step_dir = str(workdir / "checkpoints" / "1")
    (out / "normalized.jax").write_bytes(b"old")
    with pytest.raises(export.ExportPathError, match="overwrite"):
        export.export_checkpoint(step_dir, str(out / "normalized.jax"))
    assert (out / "normalized.jax").read_bytes() == b"old"
    sidecar = export.export_checkpoint(step_dir, str(out / "normalized.jax"), input_format="normalized", overwrite=True)
    assert sidecar["platforms"] == ["cpu"] and sidecar["image_size"] == 48

    # The eval images exactly as the eval step gets them (one batch: the whole split).
    batch = next(iter(data.eval_batches("digits", global_batch_size=360, image_size=48)))
    assert batch["mask"].all()
    normalized = np.asarray(batch["image"], np.float32)
    mean, inv_std = export.normalization_constants()
    pixels = (normalized.astype(np.float64) / inv_std + mean).astype(np.float32)
    np.savez(out / "images.npz", normalized=normalized, pixels=pixels)
    (tmp_path / "consumer.py").write_text(CONSUMER)
    proc = runs.run([tmp_path / "consumer.py", out], env)
    assert "consumer ok" in proc.stdout
    got = dict(np.load(out / "logits.npz"))

    # The checkpoint's eval-mode model, as evaluate.py builds it, on the same images: the
    # eval pipeline's, and the pixels normalised as the pixel artifact does (float32, the
    # same two operations; they differ from the pipeline's images in the last bit).
    model, variables, meta = checkpoints.load(str(workdir))
    assert meta["step"] == 1 and meta["model"] == "resnet18_3g"
    reference = jax.jit(lambda x: model.apply(variables, x, train=False), compiler_options=FAST_COMPILE)
    renormalized = (pixels - mean) * inv_std
    assert renormalized.dtype == np.float32 and np.max(np.abs(renormalized - normalized)) < 1e-5
    want = np.asarray(reference(np.concatenate([normalized, renormalized[:8]])))
    want, want_pixels = want[:360], want[360:]
    scale = float(np.max(np.abs(want)))
    errors = {}
    for name, logits, expected in (
        ("normalized", got["normalized"], want),
        ("batch of 1", got["b1"], want[:1]),
        ("batch of 3", got["b3"], want[1:4]),
        ("pixels", got["pixels"], want_pixels),
    ):
        assert logits.dtype == np.float32 and logits.shape == expected.shape, name
        errors[name] = float(np.max(np.abs(logits - expected)))
        assert errors[name] <= 1e-5 * scale, f"{name}: max abs diff {errors[name]:.3g}, max |logit| {scale:.3g}"
    print("export round trip, max |artifact logits - eval model logits|:", errors, "max |logit|:", scale)

    # The loss and top-1 error of the run's final evaluation, from the artifact's logits.
    labels = np.asarray(batch["label"])
    logits = got["normalized"].astype(np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    loss = float(-np.mean(log_probs[np.arange(len(labels)), labels]))
    print(f"eval loss from the artifact {loss:.7f}, from the run's evaluation {evaluated['eval/loss']:.7f}")
    np.testing.assert_allclose(loss, evaluated["eval/loss"], rtol=1e-5)
    # One example may change places where two logits agree to within the rounding.
    top1_error = float(np.mean(np.argmax(logits, -1) != labels))
    assert abs(top1_error - evaluated["eval/top1_error"]) <= 1 / 360 + 1e-6


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    proc = runs.run(
        ["-m", "gg_jax.export", f"--checkpoint={tmp_path}", f"--out={tmp_path / 'a.jax'}", "--platforms=gpu"],
        runs.subprocess_env(tmp_path),
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Unknown platform 'gpu' (for NVIDIA GPUs 'cuda'" in lines[0], (
        lines
    )
    (tmp_path / "taken.jax").write_bytes(b"keep")
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "a.jax"), "--platforms", "cpu,gpu"])
    assert "'cuda'" in capsys.readouterr().err
    for out, message in (
        (tmp_path / "taken.jax", "exists; pass --overwrite"),
        (tmp_path, "is a directory"),
        (tmp_path / "taken.jax" / "a.jax", "Cannot create the directory"),
        (tmp_path / "new.jax", "holds no gg_jax checkpoint"),  # --out is fine; the checkpoint is not.
    ):
        with pytest.raises(UserError, match=message):
            export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(out)])
    assert (tmp_path / "taken.jax").read_bytes() == b"keep"
    assert not (tmp_path / "new.jax").exists()
    # On the command line, each is one `error:` line and exit status 1.
    proc = runs.run(
        ["-m", "gg_jax.export", f"--checkpoint={tmp_path / 'missing'}", f"--out={tmp_path / 'new.jax'}"],
        runs.subprocess_env(tmp_path),
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines[-1].startswith("error: ") and "holds no gg_jax checkpoint" in lines[-1]


def test_export_and_nnx_modules_import_without_tensorflow_or_torch():
    code = (
        "import sys\n"
        "sys.modules.update(tensorflow=None, torch=None, orbax=None)\n"  # `import tensorflow` now fails.
        "import gg_jax.export, gg_jax.nnx\n"
        "mean, inv_std = gg_jax.export.normalization_constants()\n"
        "print('imported', mean.dtype)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(runs.REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "imported float32" in proc.stdout, runs.tail(proc)


def test_export_and_diagnose_on_a_damaged_checkpoint_say_so_in_one_line(tmp_path, tiny_run):
    """The command-line tools share train.py's error path: a damaged checkpoint is one `error:`
    line naming the directory to move away, exit status 1, nothing written."""
    import shutil

    source, _ = tiny_run
    work = tmp_path / "run"
    shutil.copytree(source, work)
    variables = work / "checkpoints" / "1" / "variables"  # What export and diagnose read.
    largest = max((p for p in variables.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)
    env = runs.subprocess_env(tmp_path)
    for tool, out in (("gg_jax.export", tmp_path / "model.jax"), ("gg_jax.diagnose", tmp_path / "diag")):
        proc = runs.run(["-m", tool, f"--checkpoint={work}", f"--out={out}"], env, check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, runs.tail(proc)
        assert lines[-1].startswith("error: The latest checkpoint, step 1, is damaged") and "mv " in lines[-1], lines
        assert not [line for line in lines if line.startswith(("W", "WARNING"))], lines  # No library noise.
        assert not out.exists()
