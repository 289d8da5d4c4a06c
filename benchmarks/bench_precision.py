"""Accuracy (and, on a GPU, speed) of the head's float32 product settings against float64.

    python -m benchmarks.bench_precision                    # CPU: emulated products, C = 64
    python -m benchmarks.bench_precision --channels 256     # on a GPU: the GPU's own products

For every setting (tests/reference/precision_emulation.py `STUDY_SETTINGS`: the offered "highest",
"bf16_6x", "tf32_3x" and the rejected "bf16_9x", "bf16_3x", "bf16", "tf32") and every
input class, the relative error (Frobenius norm) against float64 of the output and of
the input gradient (cotangent: fixed random numbers), and each over float32 HIGHEST's;
a setting is accepted on a class if both are within 2x. Classes: the iSQRT root (K = 5)
of SPD matrices with condition numbers 1e2, 1e4, 1e6; the covariance -> root -> vector
pipeline on features with those covariance condition numbers and on ReLU features with
fewer positions than channels (near-singular); the golden tensors of the reference
(tests/data/resnet23_3g_golden.npz, C = 256): the root of the golden covariance and
the whole 3G head (eval mode, the reference's weights) from the golden `reduced` features.

On the CPU every product is emulated (bf16 / TF32 pieces, float32 accumulation; what
tests/test_precision.py pins). On a GPU (or with a platform other than the CPU) the
device computes them itself (`jax.lax.DotAlgorithmPreset`), and `--product_times` also
times one batched product per setting (`--batch` x C x C x C, the Newton-Schulz shape).
The re-weighting blocks' own 1x1 convolutions run at float32 (`jax.default_matmul_precision`)
so that only the head's covariance and root products vary. float64 references run on the
host CPU (`jax_enable_x64` inside this script only).

Imports jax, flax and numpy (and tests/reference/precision_emulation.py); no torch, no tensorflow.
"""

from __future__ import annotations

import argparse
import json
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.table import print_table  # noqa: E402
from gg_jax import linalg  # noqa: E402
from tests.reference import precision_emulation as pe  # noqa: E402

FACTOR = 2.0
CONDS = (1e2, 1e4, 1e6)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=64, help="C of the random classes (the golden ones have 256)")
    p.add_argument("--per_class", type=int, default=2, help="random matrices / feature sets per class")
    p.add_argument("--settings", nargs="+", default=list(pe.STUDY_SETTINGS), choices=list(pe.SETTINGS))
    p.add_argument("--no_golden", action="store_true", help="skip the golden-tensor classes")
    p.add_argument("--emulate", action="store_true", help="emulate the products even on a GPU")
    p.add_argument(
        "--product_times", action="store_true", help="time one batched C x C product per setting (not on CPU)"
    )
    p.add_argument("--batch", type=int, default=256, help="batch of the timed product")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def cases(args):
    """(name, make_fn, x, g, args, classes) of every input class, random ones stacked."""
    rng = np.random.default_rng(args.seed)
    c, per = args.channels, args.per_class
    split = {f"cond {k:.0e}": np.arange(i * per, (i + 1) * per) for i, k in enumerate(CONDS)}
    a = np.concatenate([pe.spd_matrices(rng, per, c, k) for k in CONDS])
    yield "root", pe.root_case, a, rng.standard_normal(a.shape), (), split
    x = np.concatenate([pe.spd_features(rng, per, 4 * c, c, k) for k in CONDS])
    yield "pipeline", pe.pipeline_case, x, rng.standard_normal((len(x), c * (c + 1) // 2)), (), split
    n = 49 if c > 49 else (3 * c) // 4
    x = pe.relu_features(rng, per, n, c)
    yield "pipeline", pe.pipeline_case, x, rng.standard_normal((per, c * (c + 1) // 2)), (), {f"ReLU N={n}": None}
    if not args.no_golden:
        z = pe.golden_tensors()
        a = z["covariance"].astype(np.float32)
        yield "golden root", pe.root_case, a, rng.standard_normal(a.shape), (), {"C=256": None}
        x = z["reduced"].transpose(0, 2, 3, 1).astype(np.float32)
        g = rng.standard_normal(z["vector"].shape)
        yield "golden 3G head", pe.head_case, x, g, (pe.golden_head_variables(),), {"7x7, C=256": None}


def accuracy(args, emulated):
    rows = []
    for case, make_fn, x, g, extra, classes in cases(args):
        t0 = time.perf_counter()
        named = {k: (slice(None) if v is None else v) for k, v in classes.items()}
        with jax.default_matmul_precision("float32"):
            results = pe.measure(make_fn, x, g, args.settings, emulated=emulated, classes=named, args=extra)
        for cls, errors in results.items():
            f0, g0 = errors.get("highest", (float("nan"), float("nan")))
            for setting, (f, gr) in errors.items():
                rows.append(
                    {
                        "case": case,
                        "class": cls,
                        "setting": setting,
                        "forward_error": f,
                        "gradient_error": gr,
                        "forward_ratio": f / f0,
                        "gradient_ratio": gr / g0,
                        "accepted": bool(f <= FACTOR * f0 and gr <= FACTOR * g0),
                    }
                )
        print(f"  {case}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def product_times(args):
    """Median seconds of one `[batch, C, C] @ [batch, C, C]` float32 product per setting."""
    from benchmarks.timing import median_seconds

    rng = np.random.default_rng(args.seed)
    c = 256
    a = jnp.asarray(rng.standard_normal((args.batch, c, c)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((args.batch, c, c)), jnp.float32)
    out = {}
    for setting in args.settings:
        f = jax.jit(lambda a, b, p=pe.SETTING_PRESETS[setting]: jnp.matmul(a, b, precision=p))
        try:
            jax.block_until_ready(f(a, b))
            secs = median_seconds(lambda f=f: jax.block_until_ready(f(a, b)), 3, 20)
        except Exception as e:  # noqa: BLE001  (a preset this GPU or XLA does not support)
            print(f"  {setting}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        out[setting] = {"seconds": secs, "tflops": 2 * args.batch * c**3 / secs / 1e12}
    return out


def main(args):
    platform = jax.default_backend()
    emulated = args.emulate or platform == "cpu"
    print(
        f"Product settings against float64 on {jax.devices()[0].device_kind} (jax {jax.__version__}), products "
        f"{'emulated on the CPU' if emulated else 'computed by the device'}; 'auto' here is "
        f"{linalg.default_matmul_precision(platform)!r}",
        flush=True,
    )
    rows = accuracy(args, emulated)
    print()
    rows_shown = [{**r, "ok": "yes" if r["accepted"] else "NO"} for r in rows]
    columns = "case class setting forward_error gradient_error forward_ratio gradient_ratio ok"
    print_table(
        rows_shown, columns, forward_error=".2e", gradient_error=".2e", forward_ratio=".3g", gradient_ratio=".3g"
    )
    ok = [s for s in args.settings if all(r["accepted"] for r in rows if r["setting"] == s)]
    print(f"x: error / float32 HIGHEST's error; ok: both within {FACTOR:g}x. Accepted on every class: {', '.join(ok)}")
    times = {}
    if args.product_times and platform != "cpu":
        times = product_times(args)
        print(f"\nOne [{args.batch}, 256, 256] x [{args.batch}, 256, 256] float32 product:")
        base = times.get("highest", {}).get("seconds")
        for setting, t in times.items():
            ratio = f"{base / t['seconds']:.2f}x highest's speed" if base else ""
            print(f"  {setting:<10}{1e3 * t['seconds']:>8.3f} ms {t['tflops']:>8.1f} TFLOP/s  {ratio}")
    if args.json:
        meta = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "emulated": emulated}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "accuracy": rows, "accepted": ok, "product_times": times}, f, indent=2)
    return rows


if __name__ == "__main__":
    main(parse_args())
