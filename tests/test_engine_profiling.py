"""`train.profile_steps=[A,B]`: a real (tiny) tokenizer run profiles steps A..B-1 and writes the table and
trace; a bad window is refused before any work; the profile window changes nothing a run computes."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_faults_support import make_npz, train_tokenizer  # noqa: E402

from twostage.config import ConfigError  # noqa: E402
from twostage.engine.config import TrainConfig  # noqa: E402
from twostage.engine.run_log import read_metrics  # noqa: E402


def test_a_tokenizer_run_writes_the_profile_of_its_window_and_trains_the_same(tmp_path):
    data = make_npz(tmp_path)
    plain = train_tokenizer("vq", data, tmp_path / "plain", steps=4)
    profiled = train_tokenizer("vq", data, tmp_path / "profiled", steps=4, extra=["train.profile_steps=[1,3]"])
    table = (profiled / "profile" / "steps_0000001-0000003.txt").read_text()
    assert "2 step(s) on cpu" in table and "wall per step" in table
    assert "n/a (no CUDA kernels: a CPU run)" in table
    ops = int(next(line for line in table.splitlines() if line.startswith("CPU events per step")).split()[4])
    assert ops > 100  # forward + backward + optimizer of a real VQ tokenizer
    assert "aten::convolution" in table or "aten::conv2d" in table  # the op table, by CPU time
    if "aten::copy_" in table:  # then the copies' table follows, by CPU time
        assert "copies (aten::copy_) by caller and shape, per step, by CPU time" in table
    trace = json.loads(gzip.open(profiled / "profile" / "trace_steps_0000001-0000003.json.gz").read())
    assert trace["traceEvents"]
    assert not (plain / "profile").exists()
    losses = [[r["autoencoder/loss"] for r in read_metrics(run) if "autoencoder/loss" in r] for run in (plain, profiled)]
    assert losses[0] == losses[1] and len(losses[0]) == 4  # profiling observes; it does not change the run


@pytest.mark.parametrize("window", [[5], [3, 3], [-1, 2], [2, 11]])
def test_a_bad_profile_window_is_refused_with_the_fix(window):
    with pytest.raises(ConfigError, match=r"train.profile_steps=.*e.g. train.profile_steps=\[100,120\]"):
        TrainConfig(steps=10, profile_steps=window).check()


def test_the_window_is_not_part_of_a_default_configs_identity():
    from twostage import config as configlib

    assert "profile_steps" not in configlib.to_dict(TrainConfig())  # job ids of existing studies stay



def test_the_table_of_a_cuda_window_reports_device_busy_time_and_kernels(tmp_path):
    """The CUDA branch (no GPU here): kernel events' own device time summed per step against the wall
    time, kernels per step, the op table sorted by device time."""
    from types import SimpleNamespace

    import torch
    from torch.autograd import DeviceType

    from twostage.engine.profiling import StepProfiler

    kernels = [SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=1500.0) for _ in range(8)]
    ops = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=0.0) for _ in range(20)]
    sorted_by = []

    class FakeProfile:
        def events(self):
            return kernels + ops

        def key_averages(self):
            return SimpleNamespace(table=lambda sort_by, **_: sorted_by.append(sort_by) or "TABLE")

        def export_chrome_trace(self, path):
            Path(path).write_text('{"traceEvents": []}')

    profiler = StepProfiler([10, 14], tmp_path, torch.device("cuda"))
    profiler._write(FakeProfile(), wall_s=0.024, steps=4)  # 8 kernels x 1.5 ms in 24 ms of wall time
    text = (tmp_path / "profile" / "steps_0000010-0000014.txt").read_text()
    assert "4 step(s) on cuda" in text
    assert "wall per step                  6.00 ms" in text
    assert "device busy per step           3.00 ms  (50% of the wall time" in text
    assert "kernels per step                  2" in text and "CPU events per step               5" in text
    assert text.rstrip().endswith("TABLE") and sorted_by == ["self_device_time_total"]  # no copies: no copy table
    assert (tmp_path / "profile" / "trace_steps_0000010-0000014.json.gz").is_file()


def test_the_copies_are_grouped_by_the_ops_that_made_them_with_their_kernels_device_time():
    """A step's layout / dtype conversions (aten::copy_), per step by caller and shape: 13.7% of a compiled
    tokenizer step's device time on an H200 went to 98 copies per step whose source the table did not say."""
    from types import SimpleNamespace

    from twostage.engine.profiling import copy_sources

    def op(name, parent=None, shapes=(), kernels_us=()):
        kernels = [SimpleNamespace(self_device_time_total=us) for us in kernels_us]
        return SimpleNamespace(name=name, cpu_parent=parent, input_shapes=[list(s) for s in shapes],
                               kernels=kernels, self_cpu_time_total=5.0)

    backward = op("aten::convolution_backward", op("autograd::engine::evaluate_function: ConvolutionBackward0"))
    to = op("aten::to", backward)
    copies = [op("aten::copy_", to, [(64, 64, 3, 3)], [20.0]) for _ in range(6)]  # 3 per step, 20 us each
    copies += [op("aten::copy_", op("aten::contiguous"), [(128, 8, 8, 8)], [100.0]) for _ in range(2)]
    lines = copy_sources([*copies, backward, to, op("aten::mm")], steps=2, on_device=True)
    assert lines[1].startswith("copies (aten::copy_) by caller and shape, per step, by device time")
    first, second = lines[3], lines[4]  # the costliest first: 2 x 100 us before 6 x 20 us
    assert first.split()[:2] == ["1.0", "0.100"] and "aten::contiguous" in first and "[128, 8, 8, 8]" in first
    assert second.split()[:2] == ["3.0", "0.060"] and "aten::to <- aten::convolution_backward" in second
    assert "[64, 64, 3, 3]" in second
    assert lines[-1].split()[:2] == ["4.0", "0.160"] and lines[-1].endswith("all copies")
    assert copy_sources([op("aten::mm")], steps=1, on_device=True) == []
