"""`study run`: execute a study's jobs, skipping what is done, then write the results table.

Every stage is a `twostage` command run in-process through `twostage.cli.main`, so what the study
did is exactly what DIR/commands.log lists and anyone can repeat by hand. On a CPU or a single GPU
the jobs run one after the other in this process. With several GPUs, independent jobs run at the
same time, one per GPU, each as `python -m twostage study run DIR/study.yaml --out DIR --only JOB` in
a subprocess that sees only its GPU (CUDA_VISIBLE_DEVICES); a generator job starts once its tokenizer
(and reference) job has finished. Subprocess output goes to DIR/logs/JOB.log.
"""

from __future__ import annotations

from twostage.common.errors import UserError

import contextlib
import logging
import os
import queue
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from twostage import config as configlib
from twostage.study.jobs import Job, clear_markers_after, job_done, read_marker, write_marker
from twostage.study.plan import Plan, build_plan
from twostage.study.spec import StudySpec

log = logging.getLogger(__name__)

SPEC_FILE = "study.yaml"  # the resolved spec of the last `study run` into DIR (children read it)


class StageError(UserError, RuntimeError):
    """A stage's command failed; the message holds the command line to repeat it by hand."""


def command_line(argv: list[str]) -> str:
    return "twostage " + shlex.join(argv)


@contextlib.contextmanager
def _argv(argv: list[str]):
    # Commands record sys.argv as "the command that made this file" (eval JSONs); make it the stage's.
    saved = sys.argv
    sys.argv = ["twostage", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def invoke(argv: list[str], root: Path) -> None:
    """Run one `twostage` command in this process; log it; raise StageError on a non-zero exit."""
    from twostage import cli

    line = command_line(argv)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "commands.log", "a") as fh:  # one short append per line: safe across processes
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}\n")
    log.info("study: %s", line)
    with _argv(argv):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse errors exit
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # name the command to repeat; the cause stays chained
            raise StageError(f"{type(exc).__name__}: {exc}\n  in: {line}") from exc
    if code != 0:
        raise StageError(f"exit code {code} from: {line}")


def run_job(job: Job, root: Path, runner: Callable[[list[str], Path], None] | None = None) -> int:
    """Run the job's stages that are not done; returns how many ran. runner(argv, root): default invoke."""
    runner = runner or invoke  # looked up at call time, so tests can wrap the module's invoke
    ran = 0
    for stage in job.stages:
        if read_marker(job, stage, root) is not None:
            continue
        start = time.perf_counter()
        clear_markers_after(job, stage)  # before running: an interrupted redo leaves nothing stale behind
        runner(stage.argv, root)
        write_marker(job, stage, root, time.perf_counter() - start)
        ran += 1
    return ran


def _check_deps(plan: Plan, job: Job) -> None:
    for dep in job.deps:
        if not job_done(plan.by_id(dep), plan.root):
            raise StageError(f"job {job.id} needs {dep} to be finished first "
                             f"(run the whole study, or `--only {dep}` before)")


def run_sequential(plan: Plan, runner: Callable[[list[str], Path], None] | None = None) -> None:
    total = len(plan.jobs)
    for i, job in enumerate(plan.jobs, 1):
        if job_done(job, plan.root):
            log.info("study: [%d/%d] %s (%s) is done", i, total, job.id, job.label)
            continue
        log.info("study: [%d/%d] %s (%s)", i, total, job.id, job.label)
        _check_deps(plan, job)
        run_job(job, plan.root, runner)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def launch_subprocess(job: Job, gpu: int, root: Path, threads: int | None = None) -> None:
    """Run one job in a child process that sees only GPU `gpu`.

    threads: CPU threads for the child's BLAS / torch intra-op pools (unless the user set them).
    Jobs sharing a machine must split its cores: six children with one pool of all 16 cores each
    made a 2-second FD eigendecomposition take minutes on an H100 host."""
    argv = [sys.executable, "-m", "twostage", "study", "run", str(root / SPEC_FILE), "--out", str(root), "--only", job.id]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    if threads is not None:
        env.update({var: str(threads) for var in THREAD_VARS if var not in os.environ})
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{job.id}.log", "ab") as fh:
        code = subprocess.run(argv, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise StageError(f"job {job.id} failed on GPU {gpu} (exit code {code}); see {logs / f'{job.id}.log'}")


def run_parallel(plan: Plan, gpus: list[int], launch: Callable[[Job, int], None]) -> None:
    """Run the plan's unfinished jobs, one per entry of `gpus` at a time (a GPU listed k times takes k
    jobs at once), each once its dependencies are done. A failed job does not stop the others (as
    `make -k`): every job that does not depend on it still runs, so one bad run costs one run of a
    time-limited allocation, not the rest of it; the errors are raised together at the end."""
    pending = {j.id: j for j in plan.jobs if not job_done(j, plan.root)}
    finished = {j.id for j in plan.jobs if j.id not in pending}
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for gpu in gpus:
        free.put(gpu)

    def on_gpu(job: Job) -> None:
        gpu = free.get()
        try:
            log.info("study: %s (%s) on GPU %d", job.id, job.label, gpu)
            launch(job, gpu)
        finally:
            free.put(gpu)

    running: dict[Future, str] = {}
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        while pending or running:
            ready = [j for j in pending.values() if all(d in finished for d in j.deps)]
            for job in ready:
                del pending[job.id]
                running[pool.submit(on_gpu, job)] = job.id
            if not running:
                break  # what is left depends on a failed job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job_id = running.pop(fut)
                if fut.exception() is not None:
                    errors.append(fut.exception())
                else:
                    finished.add(job_id)
    if errors:
        raise StageError("; ".join(str(e) for e in errors))


def save_spec(spec: StudySpec, root: Path) -> None:
    configlib.save(spec, root / SPEC_FILE)  # atomic: child jobs read it


def run_study(spec: StudySpec, root: Path, only: list[str] | None = None, gpus: int | None = None,
              jobs_per_gpu: int = 1) -> Plan:
    """Run a study into `root` (validated completely before anything runs); returns its plan.

    only: run just these job ids (their dependencies must be done). gpus: number of GPUs to spread
    jobs over (default: torch.cuda.device_count()). jobs_per_gpu: jobs sharing a GPU at once. With a
    single slot in all (<= 1 GPU, 1 job per GPU) everything runs in this process.
    """
    if jobs_per_gpu < 1:
        raise ValueError(f"jobs_per_gpu must be >= 1, got {jobs_per_gpu}")
    root = Path(root)
    plan = build_plan(spec, root)  # loads and checks every config of the grid
    if only:
        for job_id in only:
            job = plan.by_id(job_id)
            _check_deps(plan, job)
            run_job(job, root)
        return plan
    save_spec(spec, root)
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    slots = [gpu for gpu in range(max(gpus, 1)) for _ in range(jobs_per_gpu)]
    from twostage.study.table import write_table

    try:
        if len(slots) > 1:
            threads = max(1, (os.cpu_count() or 1) // len(slots))
            run_parallel(plan, slots, lambda job, gpu: launch_subprocess(job, gpu, root, threads))
        else:
            run_sequential(plan)
    finally:  # a failed job must not hide the runs that finished: the table lists every finished one
        write_table(spec, plan)
    return plan


__all__ = ["StageError", "invoke", "run_job", "run_sequential", "run_parallel", "launch_subprocess", "run_study",
           "command_line", "save_spec", "SPEC_FILE"]
