"""Wall-clock timing shared by the benchmarks (imports nothing but the standard library)."""

import statistics
import time


def median_seconds(fn, warmup: int, reps: int) -> float:
    """Median wall time of `fn()` over `reps` calls, after `warmup` untimed calls.

    `fn` must block until its work is done (`jax.block_until_ready`, `torch.cuda.synchronize`).
    """
    for _ in range(warmup):
        fn()
    return float(statistics.median(call_times(fn, reps)))


def call_times(fn, reps: int) -> list:
    """Wall time of each of `reps` calls of `fn()` (seconds); `fn` must block, as above."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times
