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
- generator training FLOPs: what the training stages did, C = training FLOPs per token (each run's
  model.json) x tokens seen (twostage/study/flops.py), summed over the runs that were trained (by their own
  job or as replicas of a finished pack; budgets branched from a longer run add nothing).
- tokenizer training FLOPs: one training step of each tokenizer config counted by torch.utils.flop_counter
  on the CPU at batch 4 (forward + backward of every phase active at the run's middle step, the frozen
  perceptual / VF networks included), scaled to the run's batch size and steps, summed over the finished
  tokenizer jobs (a few seconds per distinct config). Operations outside matmuls and convolutions
  (norms, activations) are not counted, as in the generators' convention.
- on CUDA only: model-FLOP utilization = generator FLOPs / generator-training time / 790e12 (H200/H100
  dense bf16 peak), twice: over the summed wall times of the training stages (the GPU-seconds the jobs
  held: with --jobs-per-gpu k > 1 jobs share a GPU, so this understates what the GPU did), and over
  their elapsed time (the union of the stages' [finished - wall_s, finished] intervals from the markers:
  what one GPU delivered while any of them trained). Both wall times include data loading, validation,
  checkpoints and compilation, so both are lower bounds on the training loops' MFU. The same for the
  tokenizer training stage. A stage resumed across device calls keeps only its last attempt's wall
  time in its marker while its FLOPs count the whole run: its MFU is then too high.
- tokenizer timelines, where a tokenizer run's metrics.jsonl is kept: per run, the first logged window's
  step time (start-up and compilation), the median step time after it, and the pauses: wall time between
  two log rows beyond their steps x step time (checkpoints with their validation and previews; the
  engine leaves them out of the step time), the largest one with its step. Several runs sharing a GPU
  slow each other's steps, so compare the median with the same sharing.
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

from twostage import config as configlib  # noqa: E402
from twostage.study.jobs import read_marker  # noqa: E402
from twostage.study.plan import Plan, build_plan  # noqa: E402
from twostage.study.runner import SPEC_FILE  # noqa: E402
from twostage.study.spec import load_spec  # noqa: E402

PEAK_BF16 = 790e12  # FLOP/s, dense bf16 (H200 / H100 SXM)

# (job kind, stage name prefix) -> reported stage, in the order printed
STAGES = (
    ("reference", "stats", "reference statistics"),
    ("tokenizer", "train", "tokenizer training"),
    ("tokenizer-pack", "train", "tokenizer training"),
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


def _interval(record: dict[str, Any]) -> tuple[float, float] | None:
    """[start, end] of a finished stage in seconds since the epoch, from its marker (None without a time)."""
    from datetime import datetime

    finished = record.get("finished")
    if not finished:
        return None
    end = datetime.fromisoformat(str(finished).replace("Z", "+00:00")).timestamp()
    return end - float(record.get("wall_s", 0.0)), end


def elapsed(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: the time during which at least one ran."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def stage_times(plan: Plan) -> dict[str, Any]:
    """Per reported stage: {"wall_s", "elapsed_s" (union of its stages' intervals), "stages" (markers
    counted), "missing" (stages not done)}; plus the slowest single stages and the markers outside the plan."""
    per: dict[str, dict[str, float]] = {name: {"wall_s": 0.0, "stages": 0, "missing": 0} for _, _, name in STAGES}
    spans: dict[str, list[tuple[float, float]]] = {}
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
            span = _interval(record)
            if span is not None:
                spans.setdefault(name, []).append(span)
            single.append((float(record.get("wall_s", 0.0)), job.id, stage.name, job.label))
    for name, entry in per.items():
        entry["elapsed_s"] = elapsed(spans.get(name, []))
    known = {str(job.marker(s.name)) for job in plan.jobs for s in job.stages}
    outside = [p for p in plan.root.glob("*/*/done/*.json") if str(p) not in known]
    single.sort(reverse=True)
    return {"stages": per, "slowest": single[:5], "outside_plan": len(outside)}


def generator_flops(plan: Plan) -> tuple[float, int, list[str]]:
    """(training FLOPs the generator-training stages did, number of runs trained, their devices).

    A run counts when it was trained, by its own train stage or as a replica of a finished pack: its
    model.json's training FLOPs per token x its steps x batch x tokens per image (the `compute`
    convention, twostage/study/flops.py). A budget branched from a longer run trained nothing of its own,
    and a run whose training finished but whose evaluation did not still counts."""
    from twostage.study.flops import recorded_flops_per_token, training_compute

    jobs = {j.id: j for j in plan.jobs}
    total, runs, devices = 0.0, 0, []
    for gen, job in zip(plan.generators, plan.generator_jobs):
        devices += [d for d in [_device(job.folder)] if d is not None]
        if any(s.name == "branch" for s in job.stages):
            continue
        own = next((s for s in job.stages if s.name == "train"), None)
        pack = next((jobs[d] for d in job.deps if d.startswith("pack-") and d in jobs), None)
        trained = (own is not None and read_marker(job, own, plan.root) is not None) or \
            (pack is not None and read_marker(pack, pack.stages[0], plan.root) is not None)
        model_json = job.folder / "model.json"
        if not trained or not model_json.is_file():
            continue
        per_token = recorded_flops_per_token(json.loads(model_json.read_text()), str(model_json))
        train = gen.config.train
        total += training_compute(per_token, train.steps, train.batch_size, gen.tokenizer.tokens_per_image)[1]
        runs += 1
    return (total if runs else math.nan), runs, devices


TOKENIZER_FLOP_BATCH = 4  # FLOPs scale with the batch; counting at 4 keeps the CPU pass to seconds


def tokenizer_step_flops(kind: str, config: Any, step: int, count_batch: int = TOKENIZER_FLOP_BATCH) -> float:
    """Training FLOPs of one step of a tokenizer config at its configured batch size: forward + backward of
    the phases active at `step`, counted at `count_batch` images (see the docstring) and scaled."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from twostage import registry
    from twostage.engine.task import PhaseContext

    _, cfg = registry.load_config("tokenizer", configlib.to_dict(config), ["train.device=cpu", "train.compile=false"])
    task = registry.tokenizer_kind(kind).task_class()(cfg, channels_last=False)
    b, size = count_batch, cfg.data.image_size
    images = torch.rand(b, cfg.model.in_channels, size, size) * 2 - 1
    batch, scratch = (images, torch.zeros(b, dtype=torch.long)), {}
    counter = FlopCounterMode(display=False)
    with counter:
        for phase in task.phases():
            if phase.active(step):
                loss, _ = phase.loss(PhaseContext(batch, step, task.modules, scratch, torch.device("cpu")))
                loss.backward()
    return counter.get_total_flops() * cfg.train.batch_size / b


def _device(run_dir: Path) -> str | None:
    """The device a run trained on, from its run.json (None without one)."""
    run_json = run_dir / "run.json"
    return str(json.loads(run_json.read_text()).get("device", "?")) if run_json.is_file() else None


def tokenizer_flops(plan: Plan) -> tuple[float, int, list[str]]:
    """(training FLOPs of the finished tokenizer jobs, how many, their devices from run.json)."""
    from twostage.study.jobs import tokenizer_id

    by_id = {f"tok-{tokenizer_id(t)}": t for t in plan.tokenizers}
    per_config: dict[str, float] = {}
    total, runs, devices = 0.0, 0, []
    jobs = {j.id: j for j in plan.jobs}
    for job in plan.jobs:
        tok = by_id.get(job.id)
        train = next((s for s in job.stages if s.name == "train"), None)
        # trained by its own train stage, or as a replica of a finished tokenizer pack
        pack = next((jobs[d] for d in job.deps if jobs.get(d) is not None and jobs[d].kind == "tokenizer-pack"), None)
        trained = (train is not None and read_marker(job, train, plan.root) is not None) or \
            (pack is not None and read_marker(pack, pack.stages[0], plan.root) is not None)
        if job.kind != "tokenizer" or tok is None or not trained:
            continue
        devices += [d for d in [_device(job.folder)] if d is not None]
        key = json.dumps([tok.kind, tok.preset, [o for o in tok.overrides if not o.startswith("train.seed=")]])
        if key not in per_config:
            per_config[key] = tokenizer_step_flops(tok.kind, tok.config, tok.config.train.steps // 2)
        total += per_config[key] * tok.config.train.steps
        runs += 1
    return (total if runs else math.nan), runs, devices


def tokenizer_timelines(plan: Plan) -> list[dict[str, Any]]:
    """Per tokenizer run (or joint run of stacked seeds) with a metrics.jsonl: start-up, median step time
    and checkpoint pauses (seconds)."""
    out = []
    for job in plan.jobs:
        rows_file = job.folder / "metrics.jsonl"
        if job.kind not in ("tokenizer", "tokenizer-pack") or not rows_file.is_file():
            continue
        rows = [r for r in (json.loads(line) for line in rows_file.read_text().splitlines() if line.strip())
                if "perf/step_time_s" in r and "time" in r]
        if len(rows) < 3:
            continue
        # the first checkpoint (step train.ckpt_every) pauses the window that holds it: validation, previews
        config = job.folder / "config.yaml"
        every = configlib.read_source(config).get("train", {}).get("ckpt_every") if config.is_file() else None
        pauses, first_ckpt = [], math.nan  # (seconds outside the steps between two log rows, the later row's step)
        for a, b in zip(rows, rows[1:]):
            if b["step"] > a["step"]:  # a resumed run logs its steps again from the checkpoint
                pauses.append((b["time"] - a["time"] - (b["step"] - a["step"]) * b["perf/step_time_s"], b["step"]))
                if every and a["step"] <= every < b["step"] and math.isnan(first_ckpt):
                    first_ckpt = pauses[-1][0]
        steady = sorted(r["perf/step_time_s"] for r in rows[1:])
        worst = max(pauses, default=(0.0, 0))
        out.append({"job": job.id, "label": job.label, "first_window_step_s": rows[0]["perf/step_time_s"],
                    "first_window_steps": rows[0]["step"], "median_step_s": steady[len(steady) // 2],
                    "pauses_s": sum(max(p, 0.0) for p, _ in pauses), "largest_pause_s": worst[0],
                    "largest_pause_step": worst[1], "first_checkpoint_pause_s": first_ckpt})
    return out


def summarize(plan: Plan, *, end_to_end_s: float | None = None, peak_mem: int | None = None,
              in_process: bool = False) -> dict[str, Any]:
    t = stage_times(plan)
    flops, runs, devices = generator_flops(plan)
    gen_wall = t["stages"]["generator training"]["wall_s"]
    gen_elapsed = t["stages"]["generator training"]["elapsed_s"]
    cuda = any(d.startswith("cuda") for d in devices)
    tok_flops, tok_runs, tok_devices = tokenizer_flops(plan)
    tok_elapsed = t["stages"]["tokenizer training"]["elapsed_s"]
    out: dict[str, Any] = {
        "folder": str(plan.root), "jobs": len(plan.jobs), "generator_runs": runs,
        "stages": t["stages"], "total_stage_wall_s": sum(v["wall_s"] for v in t["stages"].values()),
        "slowest_stages": [{"wall_s": w, "job": j, "stage": s, "label": lab} for w, j, s, lab in t["slowest"]],
        "markers_outside_plan": t["outside_plan"], "end_to_end_s": end_to_end_s,
        "generator_flops": flops, "generator_devices": sorted(set(devices)),
        "mfu": None, "mfu_elapsed": None, "peak_gpu_memory_bytes": None,
        "tokenizer_flops": tok_flops, "tokenizer_runs": tok_runs, "tokenizer_mfu_elapsed": None,
        "tokenizer_timelines": tokenizer_timelines(plan),
        "peak_gpu_memory_note": "in-process run" if peak_mem is not None else
        ("not on CUDA" if not cuda else "n/a: jobs ran in subprocesses or the folder was only read"),
    }
    if cuda and gen_wall > 0 and math.isfinite(flops):
        out["mfu"] = flops / gen_wall / PEAK_BF16
    if cuda and gen_elapsed > 0 and math.isfinite(flops):
        out["mfu_elapsed"] = flops / gen_elapsed / PEAK_BF16
    if any(d.startswith("cuda") for d in tok_devices) and tok_elapsed > 0 and math.isfinite(tok_flops):
        out["tokenizer_mfu_elapsed"] = tok_flops / tok_elapsed / PEAK_BF16
    if cuda and peak_mem is not None and in_process:
        out["peak_gpu_memory_bytes"] = peak_mem
    return out


def print_table(s: dict[str, Any]) -> None:
    total = s["total_stage_wall_s"] or math.nan
    print(f"study folder {s['folder']}: {s['jobs']} jobs, {s['generator_runs']} generator runs trained")
    print(f"{'stage':36s} {'wall s':>9s} {'share':>6s} {'elapsed s':>10s} {'stages':>7s} {'not done':>9s}")
    for name, v in s["stages"].items():
        share = v["wall_s"] / total if total else math.nan
        print(f"{name:36s} {v['wall_s']:9.1f} {100 * share:5.1f}% {v['elapsed_s']:10.1f} {int(v['stages']):7d} "
              f"{int(v['missing']):9d}")
    print(f"{'sum of stages':36s} {s['total_stage_wall_s']:9.1f}")
    if s["end_to_end_s"] is not None:
        print(f"{'end to end (study run, this process)':36s} {s['end_to_end_s']:9.1f}")
    if s["markers_outside_plan"]:
        print(f"({s['markers_outside_plan']} done markers of jobs outside this plan were left out)")
    print("slowest stages:")
    for x in s["slowest_stages"]:
        print(f"  {x['wall_s']:8.1f} s  {x['job']} {x['stage']:12s} {x['label']}")
    f = s["generator_flops"]
    print(f"generator training FLOPs (trained runs, branched budgets excluded): {f:.4g}" if math.isfinite(f) else
          "generator training FLOPs: no trained run with a model.json yet")
    gen_wall = s["stages"]["generator training"]["wall_s"]
    if gen_wall > 0 and math.isfinite(f):
        print(f"generator training throughput: {f / gen_wall:.4g} FLOP/s over {gen_wall:.1f} s of training stages")
    print(f"generator devices: {', '.join(s['generator_devices']) or '?'}")
    if s["mfu"] is not None:
        print(f"aggregate MFU vs {PEAK_BF16 / 1e12:.0f} TFLOP/s bf16: {100 * s['mfu']:.2f}% over the summed "
              f"wall times, {100 * (s['mfu_elapsed'] or math.nan):.2f}% over the elapsed time "
              f"({s['stages']['generator training']['elapsed_s']:.1f} s; both incl. data, validation, "
              "checkpoints, compilation)")
    else:
        print("aggregate MFU: n/a (generators did not train on CUDA)")
    tf = s["tokenizer_flops"]
    if math.isfinite(tf):
        print(f"tokenizer training FLOPs ({s['tokenizer_runs']} runs, flop counter at batch {TOKENIZER_FLOP_BATCH} "
              f"scaled): {tf:.4g}")
    if s["tokenizer_mfu_elapsed"] is not None:
        print(f"tokenizer training MFU vs {PEAK_BF16 / 1e12:.0f} TFLOP/s bf16: {100 * s['tokenizer_mfu_elapsed']:.2f}% "
              f"over the elapsed time ({s['stages']['tokenizer training']['elapsed_s']:.1f} s, incl. compilation "
              "and checkpoint validation; too high where a stage was resumed: its marker times the last attempt)")
    if s["tokenizer_timelines"]:
        print("tokenizer runs (metrics.jsonl): first window's step time (start-up, compilation), median step time, "
              "time outside the steps (checkpoints, validation), the first checkpoint's pause, largest pause")
        for x in s["tokenizer_timelines"]:
            print(f"  {x['job']} {x['label']:24s} first {x['first_window_steps']} steps "
                  f"{1000 * x['first_window_step_s']:7.0f} ms/step, median {1000 * x['median_step_s']:5.0f} ms/step, "
                  f"pauses {x['pauses_s']:6.1f} s, first checkpoint {x['first_checkpoint_pause_s']:5.1f} s, "
                  f"largest {x['largest_pause_s']:6.1f} s before step "
                  f"{x['largest_pause_step']}")
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
