"""The GPU benchmark scripts, as far as a CPU runs them: `benchmarks/gpu.sh`'s step
selection and time budget (with a stand-in Python that records its arguments), its smoke
test, the scripts' arguments, and tiny CPU runs of the accuracy study and product count."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name):
    return importlib.import_module(f"benchmarks.{name}")


def _gpu_sh(tmp_path, *args):
    """Run gpu.sh with PYTHON = a stand-in that logs its arguments; return the log."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "ran: $*"\n')
    fake.chmod(0o755)
    out = tmp_path / f"out_{'_'.join(args)}"  # a fresh log per call (gpu.sh appends)
    env = {**os.environ, "PYTHON": str(fake)}
    subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), str(out), *args], env=env, check=True, capture_output=True, timeout=60
    )
    return (out / "log.txt").read_text()


def test_gpu_sh_runs_named_steps_within_the_budget(tmp_path):
    subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], check=True)
    log = _gpu_sh(tmp_path, "0", "accuracy", "torch_compile_bf16_256")
    ran = [line for line in log.splitlines() if line.startswith("ran: ")]
    assert ran[0].startswith("ran: -m benchmarks.gpu_smoke --platform gpu")
    assert ran[1].startswith("ran: -m benchmarks.bench_precision --channels 256")
    assert "--no_jax" in ran[2] and "--torch_modes default" in ran[2] and len(ran) == 3, ran
    # Without names every step, in order, that fits the time left (here nothing takes
    # time, so those expected to take more than the whole budget); the rest is skipped,
    # and the log says so.
    log = _gpu_sh(tmp_path, "90")
    started = [line.split()[2] for line in log.splitlines() if line.startswith("== ") and "s left)" in line]
    assert started == [
        "accuracy",
        "r50_gap_bf16_256",
        "r50_3g_bf16_256_bf16_6x",
        "r50_isqrt_bf16_256",
        "r50_3g_bf16_128",
        "r50_3g_f32_128",
        "layers_128",
        "ops",
    ], started
    for name, need in (("r50_3g_bf16_256", 140), ("torch_compile_bf16_256", 150), ("r101_3g_bf16_128", 100)):
        assert f"== skipped {name}: " in log and f"expected to take {need} s" in log, name


def test_gpu_smoke_on_cpu(capsys):
    smoke = _load("gpu_smoke")
    smoke.main(
        smoke.parse_args(["--platform", "cpu", "--settings", "tf32_3x", "--num_blocks", "1", "--num_iters", "2"])
    )
    out = capsys.readouterr().out
    assert "auto = highest -> HIGHEST" in out and "smoke test passed (tf32_3x)" in out
    with pytest.raises(SystemExit, match="not 'gpu'"):
        smoke.main(smoke.parse_args([]))


def test_bench_train_step_arguments():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train_step", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--matmul_precisions", "--torch_modes", "--no_jax", "--head_share", "--no_torch"):
        assert flag in out, flag


def test_bench_precision_tiny_cpu_run(tmp_path, capsys):
    """Emulated on the CPU: a single bf16 pass is accepted on no class; the JSON has a row
    per class and setting."""
    bench = _load("bench_precision")
    path = tmp_path / "p.json"
    args = bench.parse_args(
        ["--channels", "4", "--per_class", "1", "--settings", "highest", "bf16", "--no_golden"] + ["--json", str(path)]
    )
    rows = bench.main(args)
    data = json.loads(path.read_text())
    assert data["meta"]["emulated"] and data["accepted"] == ["highest"]
    assert len(rows) == len(data["accuracy"]) == 2 * (3 + 3 + 1)  # settings x (root, pipeline, ReLU classes)
    assert all(r["accepted"] == (r["setting"] != "bf16") for r in rows)
    assert "Accepted on every class: highest\n" in capsys.readouterr().out


@pytest.mark.parametrize("head", ["3g"])
def test_count_products_script(head, tmp_path):
    bench = _load("count_products")
    path = tmp_path / "c.json"
    bench.main(
        bench.parse_args(["--heads", head, "--batch", "2", "--size", "4", "--channels", "16", "--json", str(path)])
    )
    counts = json.loads(path.read_text())["heads"][head]
    (fwd, _), (both, _) = counts["forward"], counts["forward_backward"]
    assert fwd["CxC"] == 12 and both["CxC"] == 36 and both["features"] == 2
    assert fwd["conv"] == 1 + 3 * 6 and both["conv"] == 3 * fwd["conv"]  # reduction + 3 blocks, fwd + 2 grads
