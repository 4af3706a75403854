"""`train.profile_steps=[A,B]`: torch.profiler over training steps A..B-1 of a real run, as a table.

Where does a step's time go? The question behind every speed-up of a study's small models: a step whose
GPU kernels add up to far less than its wall time is bound by launches and Python (CUDA graphs, fewer
ops, more work per kernel help), one whose kernels fill it is bound by arithmetic or memory traffic
(smaller inputs, better kernels help). The profile answers it on the run's own config, data loader,
compile setting and optimizer, not on a stand-in:

    twostage tokenizer train vq_fmnist_f4 train.compile=true train.steps=130 train.profile_steps=[100,120]

writes RUN/profile/steps_0000100-0000120.txt (and a Chrome trace, trace_....json.gz, for
chrome://tracing or Perfetto): wall ms per step, device-busy ms per step (the kernels' summed time),
kernels and CPU profiler events per step, and the top ops by device time (or by CPU time on a CPU run). Checkpoint
side work inside the window is excluded by choosing a window without checkpoints; the window adds the
profiler's own overhead to the wall time, so read busy / wall, not the wall time alone.

Below the table, the copies (`aten::copy_`, the memory-layout and dtype conversions a step makes) grouped
by the ops that made them and their shape, with their device time: on an H200 a compiled channels_last
tokenizer step spent 13.7% of its device time in 98 copies per step (results/throughput/README.md §5),
and on the CPU 58 of a step's 67 copies come from `convolution_backward` converting weight gradients.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import shutil
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger(__name__)

TOP_OPS = 30
TOP_COPY_SOURCES = 15


def copy_sources(events, steps: int, on_device: bool) -> list[str]:
    """Lines of a table: `aten::copy_` per step grouped by (its two nearest parent ops, its input shape),
    with time per step (device time where there are kernels, else CPU), the costliest first."""
    groups: dict[tuple[str, str], list[float]] = {}
    for e in events:
        if getattr(e, "name", None) != "aten::copy_":
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None and len(chain) < 2:
            chain.append(parent.name)
            parent = parent.cpu_parent
        shape = str(e.input_shapes[0]) if getattr(e, "input_shapes", None) else "?"
        # a copy's kernels are its children on the device: their time is the copy's device time
        us = sum(_device_time_us(k) for k in e.kernels) if on_device and hasattr(e, "kernels") else 0.0
        groups.setdefault((" <- ".join(chain) or "(top level)", shape), []).append(
            us if on_device else float(e.self_cpu_time_total))
    if not groups:
        return []
    unit = "device" if on_device else "CPU"
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))
    lines = ["", f"copies (aten::copy_) by caller and shape, per step, by {unit} time:",
             f"{'per step':>9s} {unit + ' ms':>10s}  caller <- its caller   [first input's shape]"]
    for (chain, shape), times in rows[:TOP_COPY_SOURCES]:
        lines.append(f"{len(times) / steps:9.1f} {sum(times) / steps / 1e3:10.3f}  {chain}   {shape}")
    total = sum(len(t) for t in groups.values())
    lines.append(f"{total / steps:9.1f} {sum(sum(t) for t in groups.values()) / steps / 1e3:10.3f}  all copies")
    return lines


def _device_time_us(event) -> float:
    """An event's own device time, in microseconds (torch >= 2.4 names it `device`, not `cuda`)."""
    return float(event.self_device_time_total)


class StepProfiler:
    """Profiles steps [start, stop) of the training loop: `begin(step)` before each step runs and
    `end(step)` after it (step = the number of steps done after it), then writes the table once."""

    def __init__(self, window: list[int], run_dir: Path, device: torch.device, enabled: bool = True):
        self.start, self.stop = (window[0], window[1]) if window else (0, 0)
        self.run_dir, self.device = run_dir, device
        self.enabled = enabled and bool(window)
        self._prof: profile | None = None
        self._t0 = 0.0

    def begin(self, step: int) -> None:
        if not self.enabled or self._prof is not None or step != self.start:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._sync()
        self._prof = profile(activities=activities, record_shapes=True)  # shapes: the copies' table
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if self._prof is None or step < self.stop:
            return
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.__exit__(None, None, None)
        try:
            self._write(self._prof, wall, step - self.start)
        finally:
            self._prof, self.enabled = None, False

    def close(self) -> None:
        """Stop a window the run did not reach the end of (stopped early): nothing is written."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":  # only at the window's two ends: the steps inside run unsynchronized
            torch.cuda.synchronize(self.device)

    def _write(self, prof: profile, wall_s: float, steps: int) -> None:
        folder = self.run_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"steps_{self.start:07d}-{self.stop:07d}"
        events = prof.events()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        cpu_ops = [e for e in events if e.device_type == DeviceType.CPU]
        busy_ms = sum(_device_time_us(e) for e in kernels) / 1e3
        on_device = bool(kernels)
        lines = [
            f"# train.profile_steps=[{self.start},{self.stop}]: {steps} step(s) on {self.device}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
            f"wall per step            {wall_s / steps * 1e3:10.2f} ms (profiler overhead included)",
            (f"device busy per step     {busy_ms / steps:10.2f} ms  ({busy_ms / (wall_s * 1e3):.0%} of the wall time: "
             "the kernels' summed time)") if on_device else "device busy per step            n/a (no CUDA kernels: a CPU run)",
            f"kernels per step         {len(kernels) / steps:10.0f}" if on_device else "kernels per step                n/a",
            f"CPU events per step      {len(cpu_ops) / steps:10.0f}  (ops and the calls nested in them)",
            "",
        ]
        sort = "self_device_time_total" if on_device else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS, max_name_column_width=60)
        copies = copy_sources(cpu_ops, steps, on_device)
        (folder / f"{name}.txt").write_text("\n".join(lines) + table + "\n" + "\n".join(copies) + "\n")
        trace = folder / f"trace_{name}.json"
        prof.export_chrome_trace(str(trace))
        with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        log.info("profile of steps %d-%d: %s (%.2f ms wall, %s per step)", self.start, self.stop - 1,
                 folder / f"{name}.txt", wall_s / steps * 1e3,
                 f"{busy_ms / steps:.2f} ms device-busy" if on_device else "CPU run")


@contextlib.contextmanager
def profiled_steps(window: list[int], run_dir: Path, device: torch.device, enabled: bool = True):
    """A StepProfiler for a training loop, closed however the loop ends."""
    profiler = StepProfiler(window, run_dir, device, enabled)
    try:
        yield profiler
    finally:
        profiler.close()


__all__ = ["StepProfiler", "profiled_steps"]
