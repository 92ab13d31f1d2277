"""Shared benchmark helpers: timing (median after warm-up), memcpy bandwidth, tables and CSV, machine info."""

from __future__ import annotations

import csv
import os
import platform
import random
import statistics
import time
from typing import Callable, Sequence

import torch


def time_cpu(fn: Callable[[int], object], warmup: int = 3, reps: int = 15, min_time_s: float = 0.3) -> float:
    """Median seconds of ``fn(i)`` (``i`` lets the caller rotate through buffers). Runs at least ``reps`` times and
    at least ``min_time_s`` seconds in total."""
    for i in range(warmup):
        fn(i)
    times = []
    start = time.perf_counter()
    i = 0
    while len(times) < reps or (time.perf_counter() - start < min_time_s and len(times) < 200):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def time_cpu_interleaved(fns: dict, warmup: int = 2, reps: int = 15, min_time_s: float = 1.0) -> dict:
    """Median seconds of each ``fns[name](i)``, timed round-robin: every round runs each function once, so load
    from other processes on a shared machine hits all of them alike and their ratios stay meaningful (timing one
    method after the other lets a burst of load land on a single method). The order within a round is shuffled
    (fixed seed): on the 2-core CI machine the call right after MKL's fp32 GEMV measured 10-15% slower than the
    same call later in the round (2026-11-27), so a fixed order would charge that to whichever method follows it.
    Runs at least ``reps`` rounds and at least ``min_time_s`` seconds in total (at most 200 rounds)."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    start = time.perf_counter()
    i = 0
    while i < reps or (time.perf_counter() - start < min_time_s and i < 200):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t0)
        i += 1
    return {name: statistics.median(t) for name, t in times.items()}


def time_cuda(fn: Callable[[int], object], warmup: int = 10, reps: int = 50) -> float:
    """Median seconds with CUDA events."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def memcpy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured copy bandwidth in GB/s (read + write bytes counted), the practical peak for memory-bound kernels."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timer = time_cuda if device != "cpu" else time_cpu
    t = timer(lambda i: dst.copy_(src))
    return 2 * nbytes / t / 1e9


def machine_info() -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))
    text = "\n".join(lines)
    print(text)
    return text


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
