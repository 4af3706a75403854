"""Where a study's time goes: per-stage wall time summed over jobs, generator FLOPs, and on CUDA the MFU.

    python benchmarks/bench_study.py study_demo --out /tmp/demo            # run the study (resumes), then print
    python benchmarks/bench_study.py study_demo budgets=[100,200] --out D  # spec overrides as `study run` takes them
    python benchmarks/bench_study.py runs/demo                             # read a finished study folder only
    python benchmarks/bench_study.py study_crt --out D --jobs-per-gpu 6    # as `study run` (subprocess jobs)
    python benchmarks/bench_study.py runs/demo --json                      # one JSON object instead of the table

Numbers, all from what the study wrote (nothing is re-run to measure it):

- wall time per stage, summed over the jobs of the study's plan, from their done markers
  DIR/{reference,tokenizers,generators}/*/done/<stage>.json (`wall_s`: the invocation that finished
  the stage; time of an interrupted attempt before a resume is not in it). Stages: reference statistics
  (`eval stats`), tokenizer training, encode (train + val caches), tokenizer evaluation (`eval recon`),
  generator training (incl. its checkpoint-time validation and sample grids), sampling, generation
  evaluation (`eval gen`). Markers of jobs that are not in the plan (another spec into the same
  folder) are left out and counted. A stage's wall time is what `twostage ...` took in-process,
  so the feature network's or the model's construction is in it; the runner's own overhead and the
  report are not (the end-to-end time is printed when this script ran the study).
- generator training FLOPs: the results table's `compute` column (C = training FLOPs per token x
  tokens seen; twostage/study/flops.py), summed over generator runs (the table has one row per
  evaluation seed: each run is counted once).
- on CUDA only: model-FLOP utilization = generator FLOPs / generator-training wall time / 790e12
  (H200/H100 dense bf16 peak). The wall time includes data loading, validation and checkpoints, so
  it is a lower bound on the training loop's MFU; with --jobs-per-gpu k > 1 the jobs share a GPU and
  the aggregate is over the GPU-seconds the jobs held (sum of their wall times), not the elapsed time.
- peak GPU memory: torch.cuda.max_memory_allocated of this process, only when this script ran the
  study in-process (one GPU or none, one job per GPU); jobs in subprocesses (several GPUs or
  --jobs-per-gpu > 1) and a folder that is only read report "n/a".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twostage.study.jobs import read_marker  # noqa: E402
from twostage.study.plan import Plan, build_plan  # noqa: E402
from twostage.study.runner import SPEC_FILE  # noqa: E402
from twostage.study.spec import load_spec  # noqa: E402

PEAK_BF16 = 790e12  # FLOP/s, dense bf16 (H200 / H100 SXM)

# (job kind, stage name prefix) -> reported stage, in the order printed
STAGES = (
    ("reference", "stats", "reference statistics"),
    ("tokenizer", "train", "tokenizer training"),
    ("tokenizer", "encode", "encode"),
    ("tokenizer", "recon", "tokenizer evaluation (eval recon)"),
    ("generator", "train", "generator training"),
    ("pack", "train", "generator training"),
    ("generator", "branch", "generator training"),
    ("generator", "sample", "sampling"),
    ("generator", "eval", "generation evaluation (eval gen)"),
)


def stage_name(kind: str, stage: str) -> str:
    for k, prefix, name in STAGES:
        if k == kind and (stage == prefix or stage.startswith(prefix + "_")):
            return name
    return f"{kind} {stage}"


def stage_times(plan: Plan) -> dict[str, Any]:
    """Per reported stage: {"wall_s", "stages" (markers counted), "missing" (stages not done)}; plus
    the slowest single stages and the markers outside the plan."""
    per: dict[str, dict[str, float]] = {name: {"wall_s": 0.0, "stages": 0, "missing": 0} for _, _, name in STAGES}
    single = []
    for job in plan.jobs:
        for stage in job.stages:
            name = stage_name(job.kind, stage.name)
            entry = per.setdefault(name, {"wall_s": 0.0, "stages": 0, "missing": 0})
            record = read_marker(job, stage, plan.root)
            if record is None:
                entry["missing"] += 1
                continue
            entry["wall_s"] += float(record.get("wall_s", 0.0))
            entry["stages"] += 1
            single.append((float(record.get("wall_s", 0.0)), job.id, stage.name, job.label))
    known = {str(job.marker(s.name)) for job in plan.jobs for s in job.stages}
    outside = [p for p in plan.root.glob("*/*/done/*.json") if str(p) not in known]
    single.sort(reverse=True)
    return {"stages": per, "slowest": single[:5], "outside_plan": len(outside)}


def generator_flops(plan: Plan) -> tuple[float, int, list[str]]:
    """(sum of `compute` over generator runs, number of runs, their devices from run.json)."""
    path = plan.root / "results.parquet"
    devices = []
    for job in plan.generator_jobs:
        run_json = job.folder / "run.json"
        if run_json.is_file():
            devices.append(str(json.loads(run_json.read_text()).get("device", "?")))
    if not path.is_file():
        return math.nan, 0, devices
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=["run_id", "compute"]).to_pylist()
    per_run = {r["run_id"]: r["compute"] for r in rows if r["compute"] is not None}
    return float(sum(per_run.values())), len(per_run), devices


def summarize(plan: Plan, *, end_to_end_s: float | None = None, peak_mem: int | None = None,
              in_process: bool = False) -> dict[str, Any]:
    t = stage_times(plan)
    flops, runs, devices = generator_flops(plan)
    gen_wall = t["stages"]["generator training"]["wall_s"]
    cuda = any(d.startswith("cuda") for d in devices)
    out: dict[str, Any] = {
        "folder": str(plan.root), "jobs": len(plan.jobs), "generator_runs": runs,
        "stages": t["stages"], "total_stage_wall_s": sum(v["wall_s"] for v in t["stages"].values()),
        "slowest_stages": [{"wall_s": w, "job": j, "stage": s, "label": lab} for w, j, s, lab in t["slowest"]],
        "markers_outside_plan": t["outside_plan"], "end_to_end_s": end_to_end_s,
        "generator_flops": flops, "generator_devices": sorted(set(devices)),
        "mfu": None, "peak_gpu_memory_bytes": None,
        "peak_gpu_memory_note": "in-process run" if peak_mem is not None else
        ("not on CUDA" if not cuda else "n/a: jobs ran in subprocesses or the folder was only read"),
    }
    if cuda and gen_wall > 0 and math.isfinite(flops):
        out["mfu"] = flops / gen_wall / PEAK_BF16
    if cuda and peak_mem is not None and in_process:
        out["peak_gpu_memory_bytes"] = peak_mem
    return out


def print_table(s: dict[str, Any]) -> None:
    total = s["total_stage_wall_s"] or math.nan
    print(f"study folder {s['folder']}: {s['jobs']} jobs, {s['generator_runs']} generator runs in results.parquet")
    print(f"{'stage':36s} {'wall s':>9s} {'share':>6s} {'stages':>7s} {'not done':>9s}")
    for name, v in s["stages"].items():
        share = v["wall_s"] / total if total else math.nan
        print(f"{name:36s} {v['wall_s']:9.1f} {100 * share:5.1f}% {int(v['stages']):7d} {int(v['missing']):9d}")
    print(f"{'sum of stages':36s} {s['total_stage_wall_s']:9.1f}")
    if s["end_to_end_s"] is not None:
        print(f"{'end to end (study run, this process)':36s} {s['end_to_end_s']:9.1f}")
    if s["markers_outside_plan"]:
        print(f"({s['markers_outside_plan']} done markers of jobs outside this plan were left out)")
    print("slowest stages:")
    for x in s["slowest_stages"]:
        print(f"  {x['wall_s']:8.1f} s  {x['job']} {x['stage']:12s} {x['label']}")
    f = s["generator_flops"]
    print(f"generator training FLOPs (sum of `compute`): {f:.4g}" if math.isfinite(f) else
          "generator training FLOPs: no results.parquet yet")
    gen_wall = s["stages"]["generator training"]["wall_s"]
    if gen_wall > 0 and math.isfinite(f):
        print(f"generator training throughput: {f / gen_wall:.4g} FLOP/s over {gen_wall:.1f} s of training stages")
    print(f"generator devices: {', '.join(s['generator_devices']) or '?'}")
    if s["mfu"] is not None:
        print(f"aggregate MFU vs {PEAK_BF16 / 1e12:.0f} TFLOP/s bf16: {100 * s['mfu']:.2f}% "
              "(training-stage wall time incl. data, validation, checkpoints)")
    else:
        print("aggregate MFU: n/a (generators did not train on CUDA)")
    mem = s["peak_gpu_memory_bytes"]
    print(f"peak GPU memory: {mem / 2**30:.2f} GiB (torch.cuda.max_memory_allocated, in-process run)" if mem is not None
          else f"peak GPU memory: n/a ({s['peak_gpu_memory_note']})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="study spec (YAML file or preset name), or a finished study folder holding study.yaml")
    p.add_argument("overrides", nargs="*", help="spec overrides, e.g. budgets=[100,200]")
    p.add_argument("--out", type=Path, default=None, help="study folder to run into (omit to read SPEC as a folder)")
    p.add_argument("--gpus", type=int, default=None, help="as `study run --gpus`")
    p.add_argument("--jobs-per-gpu", type=int, default=1, help="as `study run --jobs-per-gpu`")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if hasattr(signal, "SIGPIPE"):  # `... | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    folder = Path(args.spec)
    end_to_end = peak = None
    in_process = False
    if args.out is None:
        if not (folder / SPEC_FILE).is_file():
            p.error(f"{folder / SPEC_FILE} not found: give a study folder, or a spec with --out DIR to run it")
        if args.overrides:
            p.error("overrides need a spec to run (--out DIR)")
        root, spec = folder, load_spec(folder / SPEC_FILE)
    else:
        import torch

        from twostage.study.runner import run_study

        root, spec = args.out, load_spec(args.spec, args.overrides)
        gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
        in_process = max(gpus, 1) * args.jobs_per_gpu == 1
        cuda = torch.cuda.is_available() and gpus > 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run_study(spec, root, gpus=args.gpus, jobs_per_gpu=args.jobs_per_gpu)
        end_to_end = time.perf_counter() - start
        if cuda and in_process:
            peak = torch.cuda.max_memory_allocated()
    summary = summarize(build_plan(spec, root), end_to_end_s=end_to_end, peak_mem=peak, in_process=in_process)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
