"""The quick start: train.py learns the digits demo; evaluate.py on our and converted checkpoints."""

import numpy as np
import pytest

from tests import runs

# The whole demo, as the README runs it: 6 epochs, at most 3 % top-1 error on the 360
# held-out digits (0.8-1.7 % measured, in 1.5-3.5 minutes on 2 idle cores).
DEMO_EPOCHS = 6
MAX_ERROR = 0.03


def test_demo_learns_and_evaluate_py_reproduces_its_error(tmp_path):
    """The README's quick start, on a host where TensorFlow cannot be imported."""
    env = runs.without_tensorflow(runs.subprocess_env(tmp_path), tmp_path)
    workdir = tmp_path / "demo"
    train = runs.run(["train.py", "--config=configs/demo.py", f"--workdir={workdir}", "--config.profile=True"], env)
    steps = DEMO_EPOCHS * (1437 // 32)
    assert f"for {steps} steps (44 per epoch)" in train.stderr, runs.tail(train)
    _check_progress_lines(train.stderr, steps)
    assert list(workdir.glob("plugins/profile/*/*.xplane.pb")), "no profiler trace"  # --config.profile
    # Checkpoints every epoch, the last 2 kept.
    assert runs.checkpoint_steps(workdir) == [steps - 44, steps]

    scalars = runs.read_scalars(workdir)
    for tag in ("train/loss", "train/top1_error", "train/learning_rate", "train/images_per_sec"):
        assert steps in scalars[tag] and np.isfinite(scalars[tag][steps]), tag
    train_loss = scalars["train/loss"]
    assert train_loss[steps] < 0.5 * train_loss[min(train_loss)]  # log(10) = 2.3 at the start
    assert sorted(scalars["eval/top1_error"]) == [44 * (e + 1) for e in range(DEMO_EPOCHS)]  # every epoch
    final = scalars["eval/top1_error"][steps]
    assert final <= MAX_ERROR, scalars["eval/top1_error"]
    assert scalars["eval/top5_error"][steps] <= final

    # evaluate.py on the workdir: the latest checkpoint, the whole test split, the same error.
    evaluated = runs.run(["evaluate.py", "--config=configs/demo.py", f"--workdir={workdir}"], env)
    assert "read only" not in evaluated.stderr, runs.tail(evaluated)  # Orbax's note on a read-only manager.
    out = runs.last_json(evaluated.stdout)
    assert out["step"] == steps and out["num_examples"] == 360
    assert abs(out["top1_error"] - final) < 1e-6 and abs(out["top5_error"] - scalars["eval/top5_error"][steps]) < 1e-6


def _log_time(stderr: str, text: str) -> float:
    """Seconds of the day of the first absl log line containing `text` (`I1129 12:02:12.034740 ...`)."""
    line = next((line for line in stderr.splitlines() if text in line), None)
    assert line is not None, f"no log line with {text!r}\n{stderr[-4000:]}"
    hours, minutes, seconds = line.split()[1].split(":")
    return 3600 * int(hours) + 60 * int(minutes) + float(seconds)


def _check_progress_lines(stderr: str, total: int):
    """The progress line of each log step is taken when that step's metrics are on the host:
    its step's train metrics are logged with it, and its rate is the wall-clock rate since the
    previous one (the first since the end of step 1, so compilation is not in it)."""
    first = _log_time(stderr, f"Step 1 of {total}: the first step")
    p22, p44 = (_log_time(stderr, f"Step {s} of {total} (") for s in (22, 44))
    m22 = _log_time(stderr, "] [22] steps_per_sec=")
    assert abs(m22 - p22) < 0.25 * (p44 - p22), (p22, m22, p44)
    for step, start, end in ((22, first, p22), (44, p22, p44)):
        line = next(line for line in stderr.splitlines() if f"Step {step} of {total} (" in line)
        rate = float(line.split("): ")[1].split(" steps/s")[0])
        expected = (step - (1 if step == 22 else 22)) / (end - start)
        assert abs(rate / expected - 1) < 0.2, (line, expected)
        assert "ETA" in line


def _randomise_batch_norm(model, seed):
    import torch

    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.tensor(0.1 * rng.standard_normal(c), dtype=torch.float32))
                m.running_var.copy_(torch.tensor(rng.uniform(0.5, 1.5, c), dtype=torch.float32))
                m.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, c), dtype=torch.float32))
                m.bias.copy_(torch.tensor(0.1 * rng.standard_normal(c), dtype=torch.float32))


def test_evaluate_py_on_a_converted_pytorch_checkpoint(tmp_path):
    """PyTorch 3G-Net file -> `python -m gg_jax.convert` -> `evaluate.py --checkpoint`: the errors
    and loss of the PyTorch model itself on the same preprocessed test digits."""
    torch = pytest.importorskip("torch")
    from gg_jax import data
    from tests.reference.torch_reference import ReferenceResNet3G

    torch.manual_seed(0)
    model = ReferenceResNet3G("resnet18", num_classes=10).eval()  # The released layout: 256 channels, T = 3.
    _randomise_batch_norm(model, 0)
    pth = tmp_path / "resnet18_3g_digits.pth.tar"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 7, "arch": "resnet18_3g"},
        pth,
    )
    env = runs.subprocess_env(tmp_path)
    converted = tmp_path / "converted"
    runs.run(["-m", "gg_jax.convert", "--arch=resnet18_3g", f"--torch_checkpoint={pth}", f"--out={converted}"], env)

    eval_flags = [
        "--config=configs/demo.py",
        "--config.model.reduction_dim=256",
        "--config.model.num_blocks=3",
        f"--checkpoint={converted}",
    ]
    out = runs.last_json(runs.run(["evaluate.py", *eval_flags], env).stdout)

    top1 = top5 = 0
    losses = []
    with torch.no_grad():
        for batch in data.create_eval_iterator("digits", global_batch_size=120, image_size=48):
            mask = np.asarray(batch["mask"])
            images = torch.tensor(np.asarray(batch["image"])[mask].transpose(0, 3, 1, 2))
            labels = torch.tensor(np.asarray(batch["label"])[mask]).long()
            logits = model(images)
            top = logits.topk(5, -1).indices
            top1 += int((top[:, 0] == labels).sum())
            top5 += int((top == labels[:, None]).any(-1).sum())
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy())
    assert out["num_examples"] == 360
    # Two frameworks' float32 programs: an example whose top logits tie to rounding may fall
    # either way, so the counts may differ by one example (in practice they are equal).
    assert out["top1_error"] == pytest.approx(1 - top1 / 360, abs=1.01 / 360)
    assert out["top5_error"] == pytest.approx(1 - top5 / 360, abs=1.01 / 360)
    assert out["loss"] == pytest.approx(float(np.concatenate(losses).mean()), rel=1e-4)

    # A config naming another model is refused with both names.
    wrong = runs.run(
        [
            "evaluate.py",
            "--config=configs/demo.py",
            f"--checkpoint={converted}",
            "--config.model.name=resnet18_isqrt",
            "--config.model.num_blocks=None",
        ],
        env,
        check=False,
    )
    assert wrong.returncode == 1 and "holds resnet18_3g" in wrong.stderr and "resnet18_isqrt" in wrong.stderr
