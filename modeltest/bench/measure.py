"""Measuring helpers: peak host RSS (sampled), device memory, timed vision-tower calls."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from ..device import synchronize

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(anon_only: bool = False) -> int:
    """Resident memory; with anon_only, without file-backed pages (memory-mapped checkpoint
    files are page cache the OS can drop, not memory the process owns)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]), int(fields[2])
    return (resident - shared if anon_only else resident) * PAGE


class PeakRSS:
    """Samples this process's resident memory every few milliseconds while active."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.start = interval, 0, 0
        self.peak_anon = self.start_anon = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.start_anon = self.peak_anon = rss_bytes(anon_only=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self.peak_anon = max(self.peak_anon, rss_bytes(anon_only=True))
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20

    @property
    def anon_growth_mb(self) -> float:
        return (self.peak_anon - self.start_anon) / 2**20


def reset_device_peak(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).reset_peak_memory_stats(device)


def device_allocated_mb(device: torch.device) -> float:
    """Memory now allocated by torch on the device (0 on CPU)."""
    if device.type == "cpu":
        return 0.0
    return getattr(torch, device.type).memory_allocated(device) / 2**20


def device_peak_mb(device: torch.device):
    if device.type == "cpu":
        return None
    return getattr(torch, device.type).max_memory_allocated(device) / 2**20


class VisionTimer:
    """Accumulates wall time spent in a module's forward (synchronised on accelerators)."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.total, self.device, self._t0 = 0.0, device, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_):
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_):
        synchronize(self.device)
        self.total += time.perf_counter() - self._t0


@dataclass
class RunStats:
    """Wall time and memory of one timed run (filled in when its `measured_run` block exits)."""

    start: float = 0.0  # perf_counter() at the start, for first-token times
    elapsed_s: float = 0.0
    peak_host_mb: float = 0.0  # the process's peak RSS during the run
    host_growth_mb: float = 0.0  # ... minus RSS at its start
    peak_device_mb: Optional[float] = None  # torch's peak device allocation (None on CPU)
    device_growth_mb: Optional[float] = None  # ... minus the allocation at the start


@contextmanager
def measured_run(device: torch.device):
    """Times the block (synchronised on accelerators) and samples its host and device memory."""
    stats = RunStats()
    reset_device_peak(device)
    start_alloc = device_allocated_mb(device)
    with PeakRSS() as mem:
        synchronize(device)
        stats.start = time.perf_counter()
        yield stats
        synchronize(device)
        stats.elapsed_s = time.perf_counter() - stats.start
    stats.peak_host_mb, stats.host_growth_mb = mem.peak_mb, mem.growth_mb
    stats.peak_device_mb = device_peak_mb(device)
    if stats.peak_device_mb is not None:
        stats.device_growth_mb = stats.peak_device_mb - start_alloc


@contextmanager
def timed():
    t = {"s": 0.0}
    start = time.perf_counter()
    yield t
    t["s"] = time.perf_counter() - start
