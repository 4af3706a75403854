"""`twostage study run | table | report` and `twostage demo`.

    twostage study run twostage/presets/study_crt.yaml --out runs/study_crt      # resumes where it stopped
    twostage study run study_demo budgets=[100,200] --out runs/demo     # spec overrides like configs
    twostage study run study_crt --out runs/study_crt --dry-run         # the jobs and what is done
    twostage study run study_crt --out runs/study_crt --jobs-per-gpu 4  # small models: 4 jobs share a GPU
    twostage study table runs/study_crt                                 # the table of what finished so far
    twostage demo                                                        # the demo study + its report

`study run` validates the whole grid, runs every stage that is not done (each one a `twostage`
command, logged to DIR/commands.log), and writes DIR/results.parquet (+ results.csv): one row per
generator run. See twostage/study/jobs.py for the folder layout and twostage/study/__init__.py for
the table's columns.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_SPEC = "study_demo"
DEMO_OUT = Path("runs/demo")
DEMO_MAX_JOBS = 4  # parallel jobs at most (see demo_jobs)
DEMO_BOOTSTRAP = 200  # report resamples (see demo_argv)
# glibc malloc: serve blocks up to 32 MB (its maximum) from the heap and never give freed heap back.
# By default every large activation (a batch through the feature network at 224 px, a tokenizer's
# feature maps) is a fresh mmap whose pages the kernel zeroes and faults in, and trimming returns the
# rest: on 2 cores that system time was as large as the computation (EffNet-Lite0 features: 13 -> 35+
# images/s with this and batches of 10). Set only where the user has not set them.
DEMO_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def register(subparsers: argparse._SubParsersAction) -> None:
    from twostage.cli import OUT_FILE

    top = subparsers.add_parser("study", help="run a compression-generation trade-off study; report on it",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="study_command", metavar="ACTION", required=True)

    p = sub.add_parser("run", help="run (or resume) every job of a study spec, then write the results table")
    p.add_argument("spec", help="study spec: a YAML file or a preset in twostage/presets/ (e.g. study_demo)")
    p.add_argument("overrides", nargs="*", help="spec overrides, e.g. budgets=[500,1000] sample.num=1000")
    p.add_argument("--out", required=True, type=Path, help="study folder")
    p.add_argument("--only", action="append", default=None, metavar="JOB",
                   help="run only this job id (repeatable; its dependencies must be done); no table")
    p.add_argument("--gpus", type=int, default=None,
                   help="spread jobs over this many GPUs (default: all visible; 1 GPU and 1 job per GPU: in-process)")
    p.add_argument("--jobs-per-gpu", type=_at_least(1), default=1,
                   help="jobs sharing one GPU at a time (small models leave most of an H100 idle; default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and their finished stages; run nothing")
    p.set_defaults(func=cmd_run)

    t = sub.add_parser("table", help="rewrite DIR/results.parquet from the runs finished so far (e.g. after a kill)")
    t.add_argument("dir", type=Path, help="study folder (holds study.yaml from its `study run`)")
    t.set_defaults(func=cmd_table)

    # the report command's parser lives here, so `twostage --help` does not import matplotlib and scipy
    r = sub.add_parser("report", help="verdicts, fits, compute-optimal frontiers and figures from DIR/results.parquet")
    r.add_argument("dir", type=Path, nargs="+",
                   help="study folder holding results.parquet; several: runs of one spec with other seeds, "
                        "pooled into one report (twostage/study/pooling.py; needs --out)")
    r.add_argument("--out", type=Path, default=None, help="report folder (default DIR/report)")
    r.add_argument("--bootstrap", type=_at_least(0), default=1000,
                   help="resamples per fit, for the residual and the seed bootstrap (0: covariance intervals only)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    r.add_argument("--fit-points", choices=("frontier", "all"), default="frontier",
                   help="fit each tokenizer's lower envelope of cell means (compute-optimal law) or every cell")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("replication", help="do ORIGINAL's verdicts hold in RERUN (the same spec, other seeds)? "
                                           "exit 1 when a winner does not (twostage/study/replication.py)")
    c.add_argument("original", type=Path, help="study folder with a report (twostage study report)")
    c.add_argument("rerun", type=Path, help="the re-run's study folder with a report")
    c.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    c.set_defaults(func=cmd_replication, out_kind=OUT_FILE)

    v = sub.add_parser("link-run", help="a pretrained tokenizer run's view in a study folder (the study's first "
                                        "stage for a `run:` entry; twostage/study/pretrained.py)")
    v.add_argument("run", type=Path, help="tokenizer run folder (only read)")
    v.add_argument("overrides", nargs="*", help="the study's data keys, e.g. data.image_size=32")
    v.add_argument("--out", required=True, type=Path, help="view folder to write")
    v.set_defaults(func=cmd_link_run)

    d = subparsers.add_parser("demo", help="the miniature Fashion-MNIST study and its report "
                                           "(about 4 minutes on 2 CPU cores)")
    d.add_argument("--out", type=Path, default=DEMO_OUT, help=f"study folder (default {DEMO_OUT})")
    d.set_defaults(func=cmd_demo)


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum (a bad value is argparse's one-line usage error)."""
    def parse(text: str) -> int:
        n = int(text)
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def cmd_report(args: argparse.Namespace) -> int:
    """Fits, verdicts and figures of a study folder (twostage/study/report.py)."""
    from twostage.study.report import cmd_report as report

    return report(args)


def cmd_replication(args: argparse.Namespace) -> int:
    from twostage.common.atomic import write_text_atomic
    from twostage.study.replication import replication_report

    text, rows = replication_report(args.original, args.rerun)
    print(text, end="")
    if args.out is not None:
        write_text_atomic(args.out, text)
    return 1 if any(r.failed for r in rows) else 0


def cmd_link_run(args: argparse.Namespace) -> int:
    from twostage.study.pretrained import link_run

    out = link_run(args.run, args.out, args.overrides)
    print(f"linked {args.run} -> {out} (config with {len(args.overrides)} data keys, checkpoints linked)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from twostage.study.jobs import read_marker
    from twostage.study.plan import build_plan
    from twostage.study.runner import StageError, run_study
    from twostage.study.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.dry_run:
        plan = build_plan(spec, args.out)
        for job in plan.jobs:
            done = [s.name for s in job.stages if read_marker(job, s, plan.root) is not None]
            print(f"{job.id}  {len(done)}/{len(job.stages)} stages done  {job.label}")
        print(f"{len(plan.jobs)} jobs ({len(plan.tokenizer_jobs)} tokenizer grid points, "
              f"{len(plan.generator_jobs)} generator grid points)")
        return 0
    try:
        plan = run_study(spec, args.out, only=args.only, gpus=args.gpus, jobs_per_gpu=args.jobs_per_gpu)
    except (StageError, KeyError) as err:
        print(f"study error: {err}", file=sys.stderr)
        return 1
    if not args.only:
        print(f"study {spec.name}: {len(plan.generator_jobs)} generator runs; table {args.out / 'results.parquet'}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from twostage.study.jobs import job_done
    from twostage.study.plan import build_plan
    from twostage.study.runner import SPEC_FILE
    from twostage.study.spec import load_spec
    from twostage.study.table import write_table

    spec_file = args.dir / SPEC_FILE
    if not spec_file.is_file():
        print(f"study table: {spec_file} not found; `study run SPEC --out {args.dir}` writes it", file=sys.stderr)
        return 1
    spec = load_spec(spec_file)
    plan = build_plan(spec, args.dir)
    path = write_table(spec, plan)
    done = sum(job_done(job, plan.root) for job in plan.generator_jobs)
    print(f"study {spec.name}: {done}/{len(plan.generator_jobs)} generator runs finished; table {path}")
    return 0


def demo_jobs(cpus: int | None = None) -> int:
    """Jobs the demo runs at once: one per CPU core, at most DEMO_MAX_JOBS (per GPU where there are GPUs).

    The demo's models are tiny: a 2-thread torch or BLAS pool spends much of each small operation
    synchronising its threads (far more when other processes compete for the cores; the AR training
    step and FD's eigendecompositions were 2-3x slower with 2 threads than with 1 on a busy 2-core
    machine), so two single-threaded jobs side by side finish sooner than one job with two threads.
    Each job is a `study run --only JOB` subprocess whose thread pools get cores / jobs threads
    (twostage/study/runner.py launch_subprocess)."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, min(cpus, DEMO_MAX_JOBS))


def demo_argv(out: Path, jobs: int) -> list[list[str]]:
    """The two commands of `twostage demo`.

    The report resamples DEMO_BOOTSTRAP times instead of 1000: each law rests on 4 cell means and the
    seed bootstrap on 2 seeds (3 distinct resamples), so the default 1000 would be most of the report's
    time for nothing. `--fit-points all`: with one generator size every cell is on a tokenizer's
    compute frontier except through evaluation noise (100 samples), and the default lower envelope
    would drop such a cell and, with it, the law (4 points are the least a law takes)."""
    return [["study", "run", DEMO_SPEC, "--out", str(out), "--jobs-per-gpu", str(jobs)],
            ["study", "report", str(out), "--bootstrap", str(DEMO_BOOTSTRAP), "--fit-points", "all"]]


def cmd_demo(args: argparse.Namespace) -> int:
    """`study run study_demo --out DIR --jobs-per-gpu N`, then `study report DIR` (demo_argv)."""
    from twostage.study.runner import StageError, invoke

    out: Path = args.out
    added = {k: v for k, v in DEMO_MALLOC.items() if k not in os.environ}
    os.environ.update(added)  # read by glibc when each job's process starts
    try:
        for argv in demo_argv(out, demo_jobs()):
            invoke(argv, out)
    except StageError as err:
        print(f"demo error: {err}", file=sys.stderr)
        return 1
    finally:
        for k in added:
            os.environ.pop(k, None)
    print(f"demo study: {out / 'results.csv'}")
    print(f"report: {out / 'report' / 'report.html'}")
    return 0
