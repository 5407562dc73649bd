"""A benchmark's own host memory: what it may use, what it did use, and a hard stop.

    guard = HostGuard.start(limit_gb=None)   # limit: what the host can give now minus a margin
    if not guard.check(need_bytes, "both bf16 experts pinned"):   # said in one line: exit 2
        return 2
    ...
    guard.line()   # "host: peak RSS 61.2 GB (anonymous 60.1 GB, file-backed 1.3 GB), limit 104.0 GB, ..."

A thread samples /proc/self/status every 0.2 s: VmRSS and its parts (RssAnon: heap and pinned
buffers, which the host can never reclaim while they are locked; RssFile: pages of mapped files,
which it can) and keeps their peaks (VmHWM is the kernel's own peak of VmRSS). When RssAnon +
RssShmem pass the limit the thread prints one line and ends the process at once (exit 3): a run
that would take the machine's memory stops itself before the host stops answering. The limit
defaults to the memory the host can give when the guard starts (a cgroup's limit minus its usage,
else MemAvailable: wan.hostmem.host_memory) minus a margin of max(8 GB, 10 %).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

from wan.hostmem import host_memory

GB = 1e9
_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status_gb() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process in GB (0 where unreadable)."""
    out = dict.fromkeys(_FIELDS, 0.0)
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return out


def fs_type(path) -> str:
    """The file system type of the mount that holds `path` ('' when unknown): tmpfs keeps files in RAM."""
    path = os.path.realpath(path)
    best, kind = "", ""
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


@dataclass
class HostGuard:
    limit_gb: float
    available_gb: float | None
    source: str
    peaks: dict = field(default_factory=lambda: dict.fromkeys(_FIELDS, 0.0))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, limit_gb: float | None = None, interval: float = 0.2) -> "HostGuard":
        mem = host_memory()
        avail = None if mem.available is None else mem.available / GB
        if limit_gb is None:
            base = status_gb()["VmRSS"]  # what this process holds already counts against the limit
            limit_gb = base + (avail - max(8.0, 0.1 * avail) if avail is not None else 64.0)
        g = cls(limit_gb=limit_gb, available_gb=avail, source=mem.source)
        g._sample()
        g._thread = threading.Thread(target=g._run, args=(interval,), daemon=True, name="host-guard")
        g._thread.start()
        return g

    def _sample(self) -> dict:
        now = status_gb()
        for k, v in now.items():
            self.peaks[k] = max(self.peaks[k], v)
        return now

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            now = self._sample()
            held = now["RssAnon"] + now["RssShmem"]
            if held > self.limit_gb:
                print(f"host guard: this process holds {held:.1f} GB of host memory that cannot be reclaimed "
                      f"(over its limit of {self.limit_gb:.1f} GB; {self.line()}): stopping before the host runs out",
                      file=sys.stderr, flush=True)
                os._exit(3)

    def check(self, need_bytes: float, what: str, hint: str = "", prog: str = "bench") -> bool:
        """False, after one line on stderr (and the sampling thread stopped), when `need_bytes` more
        host memory than this process holds now would pass the limit; True (and a line) when it fits."""
        now = self._sample()["VmRSS"]
        need = need_bytes / GB
        if now + need > self.limit_gb:
            print(f"{prog}: error: {what} needs ~{need:.1f} GB of host memory on top of the {now:.1f} GB held, over "
                  f"the limit of {self.limit_gb:.1f} GB ({self._avail()}){'; ' + hint if hint else ''}",
                  file=sys.stderr, flush=True)
            self.stop()
            return False
        print(f"host: {what} ~{need:.1f} GB + {now:.1f} GB held, within the limit of {self.limit_gb:.1f} GB "
              f"({self._avail()})", flush=True)
        return True

    def _avail(self) -> str:
        return (f"{self.available_gb:.1f} GB available at start, {self.source}" if self.available_gb is not None
                else "host memory unknown")

    def report(self) -> dict:
        self._sample()
        return dict(peak_rss_gb=self.peaks["VmRSS"], vmhwm_gb=self.peaks["VmHWM"], peak_anon_gb=self.peaks["RssAnon"],
                    peak_file_gb=self.peaks["RssFile"], peak_shmem_gb=self.peaks["RssShmem"], limit_gb=self.limit_gb,
                    available_at_start_gb=self.available_gb, source=self.source)

    def line(self) -> str:
        r = self.report()
        return (f"host peak RSS {max(r['peak_rss_gb'], r['vmhwm_gb']):.1f} GB (anonymous {r['peak_anon_gb']:.1f} GB, "
                f"file-backed {r['peak_file_gb']:.1f} GB, shmem {r['peak_shmem_gb']:.1f} GB; sampled every 0.2 s, "
                f"VmHWM {r['vmhwm_gb']:.1f} GB), limit {r['limit_gb']:.1f} GB")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def phase_line(name: str, t0: float) -> str:
    s = status_gb()
    return f"[{name}] {time.perf_counter() - t0:.1f} s, host RSS {s['VmRSS']:.1f} GB (peak {s['VmHWM']:.1f} GB)"
