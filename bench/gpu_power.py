"""What the GPU's board power reads when it is idle and when it is saturated, to read a run's power trace by.

The runs of record's monitor (``scripts/gpu_record.sh monitor``) logs ``power.draw`` every 5 s beside
``utilization.gpu``, which reads 100% whenever any kernel runs and so cannot say whether the card is full.
This script gives the scale on the same card: the power while idle, while one process runs large bf16
matrix products back to back (the card at its compute limit, with the achieved TFLOP/s), and while it copies
a large buffer (its memory-bandwidth limit). A run whose trace sits near the first of these has room to
spare; one near the matmul line is bound by the GPU's work.

    python bench/gpu_power.py --out $OUT        # ~25 s on an H100 or H200; writes gpu_power.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

import torch


def _read_power() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        return float(out[0].split(",")[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class PowerLog:
    """Board power (W) read every ``every`` seconds in a thread, kept with its time."""

    def __init__(self, every: float = 0.25):
        self.every, self.rows, self._stop = every, [], threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            w = _read_power()
            if w is not None:
                self.rows.append((time.perf_counter(), w))
            time.sleep(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def mean(self, t0: float, t1: float, skip: float = 1.0) -> float | None:
        """Mean power between ``t0 + skip`` and ``t1`` (the first second ramps)."""
        w = [p for t, p in self.rows if t0 + skip <= t <= t1]
        return round(sum(w) / len(w), 1) if w else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds per phase")
    ap.add_argument("--size", type=int, default=8192, help="square matrix side for the matmul phase")
    ap.add_argument("--out", default=".", help="folder for gpu_power.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_power.py measures a CUDA GPU; none is visible here.")
    dev = torch.device("cuda")
    x = torch.randn(a.size, a.size, device=dev, dtype=torch.bfloat16)
    y = torch.randn(a.size, a.size, device=dev, dtype=torch.bfloat16)
    buf = torch.empty(2 ** 30 // 2, device=dev, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(buf)
    torch.cuda.synchronize()
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "phases": {}}
    with PowerLog() as log:
        t0 = time.perf_counter()
        time.sleep(a.seconds)
        out["phases"]["idle"] = {"watts": log.mean(t0, time.perf_counter())}

        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            for _ in range(20):
                torch.mm(x, y)
            torch.cuda.synchronize()
            n += 20
        dt = time.perf_counter() - t0
        out["phases"]["matmul"] = {"watts": log.mean(t0, t0 + dt), "tflops": round(2 * a.size ** 3 * n / dt / 1e12, 1)}

        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < a.seconds:
            for _ in range(20):
                dst.copy_(buf)
            torch.cuda.synchronize()
            n += 20
        dt = time.perf_counter() - t0
        out["phases"]["copy"] = {"watts": log.mean(t0, t0 + dt),
                                 "tb_per_s": round(2 * buf.numel() * buf.element_size() * n / dt / 1e12, 2)}
    out["samples"] = len(log.rows)
    path = Path(a.out) / "gpu_power.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
