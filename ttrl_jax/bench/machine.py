"""The machine the figures come from: cores, matmul peak, memory bandwidth, load, and timers.

Every benchmark prints its figures against these: a ratio between two implementations is
measured in one process with the two run in turn, and a fraction of the roofline needs the
machine's own measured peak, not a datasheet's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil


def cpu_cores() -> int:
    """Cores this process may run on (what both JAX and torch get)."""
    return len(os.sched_getaffinity(0))


def time_once(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call; `fn` must block until its work is done."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_best(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> float:
    """Best wall time of `repeats` calls after `warmup` untimed calls (compiles, caches)."""
    for _ in range(warmup):
        fn()
    return min(time_once(fn) for _ in range(repeats))


def time_best_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 3,
    say: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Best times of several contenders, run in turn so a load spike on a shared machine hits
    them alike rather than whichever happened to be running. `say` hears each run's time."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
            if say is not None:
                say(f"timed run {i + 1}/{repeats}: {name} {times[name][-1]:.2f} s")
    return {name: min(t) for name, t in times.items()}


def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Best matmul FLOP/s of the default JAX device: `jnp.dot` of two n×n matrices."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    seconds = time_best(lambda: dot(a, b).block_until_ready(), warmup=1, repeats=repeats)
    return 2 * n**3 / seconds


def measure_memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best bytes/s of reading a large float32 array once, one stream per core.

    Read-only (a max over each slice: nothing written, no output to allocate or page in), the
    slices taken by a thread per core (numpy releases the GIL in the reduction), and several
    slices per thread so a core that is briefly taken by another process does not leave the
    others idle at the end.
    """
    cores = cpu_cores()
    data = np.ones(nbytes // 4, np.float32)  # written once here, so every page is resident
    slices = np.array_split(data, 4 * cores)
    with ThreadPoolExecutor(cores) as pool:
        seconds = time_best(lambda: list(pool.map(np.max, slices)), repeats=repeats)
    return data.nbytes / seconds


@dataclasses.dataclass
class LoadProbe:
    """How busy the machine was between `start()` and `stop()`: on a shared machine the figures
    mean little without it."""

    load_before: float = 0.0
    load_after: float = 0.0
    system_busy: float = 0.0  # fraction of all cores busy (anyone)
    own_busy: float = 0.0  # fraction of all cores used by this process
    _t0: float = 0.0
    _own0: float = 0.0

    def start(self) -> LoadProbe:
        self.load_before = os.getloadavg()[0]
        psutil.cpu_percent(interval=None)  # resets psutil's system-wide counter
        self._own0 = sum(psutil.Process().cpu_times()[:2])
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> LoadProbe:
        wall = time.perf_counter() - self._t0
        self.system_busy = psutil.cpu_percent(interval=None) / 100
        own = sum(psutil.Process().cpu_times()[:2]) - self._own0
        self.own_busy = own / (wall * psutil.cpu_count())
        self.load_after = os.getloadavg()[0]
        return self

    def describe(self) -> str:
        others = max(self.system_busy - self.own_busy, 0.0)
        return (
            f"1-min load average {self.load_before:.1f} before, {self.load_after:.1f} after "
            f"({psutil.cpu_count()} logical CPUs); during the timed runs all CPUs were "
            f"{self.system_busy:.0%} busy: this process {self.own_busy:.0%}, others {others:.0%}"
        )


def si(x: float, unit: str) -> str:
    """12345678 -> '12.3 M<unit>'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}"


@dataclasses.dataclass(frozen=True)
class Machine:
    """The measured figures a benchmark's roofline uses."""

    dtype: str
    peak_flops: float
    bandwidth: float

    @classmethod
    def measure(cls, dtype: str) -> Machine:
        return cls(dtype, measure_matmul_peak(dtype=dtype), measure_memory_bandwidth())

    def remeasured(self) -> Machine:
        """The higher peak of this one and a new measurement: a shared machine may have been
        busy when the first was taken."""
        return dataclasses.replace(
            self, peak_flops=max(self.peak_flops, measure_matmul_peak(dtype=self.dtype))
        )

    def describe(self) -> str:
        import torch

        devices = jax.devices()
        return "\n".join(
            [
                f"machine: {cpu_cores()} cores; jax {jax.__version__} on {len(devices)} "
                f"{devices[0].platform} device(s); torch {torch.__version__} with "
                f"{torch.get_num_threads()} threads",
                f"  matmul peak ({self.dtype}, jnp.dot 2048x2048, best of 5): "
                f"{si(self.peak_flops, 'FLOP/s')}",
                f"  memory bandwidth (read-only, {cpu_cores()} threads, 256 MiB, best of 5): "
                f"{si(self.bandwidth, 'B/s')}",
            ]
        )
