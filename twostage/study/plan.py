"""A study's plan: every job of its grid in a runnable order, built from the spec before anything runs.

    plan = build_plan(spec, "runs/study_crt")     # loads and checks every config; writes nothing

The jobs themselves (ids, stages as command lines, done markers) are in twostage/study/jobs.py; the
plan adds the two ways a study can train its generator runs together: stacked replicas
(twostage/study/packs.py) and budgets cut from the longest run (twostage/study/branches.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twostage.config import ConfigError
from twostage.study.branches import branch_jobs
from twostage.study.jobs import Job, Paths, generator_id, generator_job, reference_job, tokenizer_cell, tokenizer_job
from twostage.study.packs import pack_jobs, tokenizer_pack_jobs
from twostage.study.spec import ResolvedGenerator, ResolvedTokenizer, StudySpec, resolve_grid


@dataclass
class Plan:
    """Every job of a study in a runnable order (references, tokenizers, then generators)."""

    root: Path
    jobs: list[Job]
    tokenizers: list[ResolvedTokenizer]
    generators: list[ResolvedGenerator]
    generator_jobs: list[Job]  # parallel to `generators`
    tokenizer_jobs: list[Job]  # parallel to `tokenizers`

    def by_id(self, job_id: str) -> Job:
        for job in self.jobs:
            if job.id == job_id:
                return job
        close = ", ".join(j.id for j in self.jobs[:8])
        raise KeyError(f"no job {job_id!r} in this study (jobs: {close}{' ...' if len(self.jobs) > 8 else ''})")


def _check_cells(spec: StudySpec, toks: list[ResolvedTokenizer], gens: list[ResolvedGenerator]) -> None:
    """Cells made by generator overrides must be distinct: their own runs and their own label. (Entries
    without them keep what they always had: two entries of one tokenizer config are one cell, one run.)"""
    runs: dict[str, ResolvedTokenizer] = {}
    for g in gens:
        first = runs.setdefault(generator_id(g, spec), g.tokenizer)
        if tokenizer_cell(first) != tokenizer_cell(g.tokenizer):  # only generator overrides can do this
            raise ConfigError(f"tokenizers[{first.index}] and tokenizers[{g.tokenizer.index}] train the same "
                              f"generator runs ({g.label}): their generator_overrides make no difference; remove "
                              "one entry or change its generator_overrides")
    labels: dict[str, ResolvedTokenizer] = {}
    for t in toks:
        other = labels.setdefault(t.label, t)
        # a pretrained run beside a trained tokenizer of its config: one label would merge them in the report
        distinct = other.generator_overrides or t.generator_overrides or other.pretrained or t.pretrained
        if tokenizer_cell(other) != tokenizer_cell(t) and distinct:
            raise ConfigError(f"tokenizers[{other.index}] and tokenizers[{t.index}] are different cells with one "
                              f"label {t.label!r}: give one of them a `label`")


def build_plan(spec: StudySpec, root: Path) -> Plan:
    toks, gens = resolve_grid(spec)
    _check_cells(spec, toks, gens)
    paths = Paths(Path(root))
    refs: dict[int, Job | None] = {}
    for tok in toks:
        size = tok.config.data.image_size
        if size not in refs:
            refs[size] = reference_job(spec, size, paths)
    tok_jobs = [tokenizer_job(spec, t, paths) for t in toks]
    tok_packs = tokenizer_pack_jobs(toks, tok_jobs, paths) if spec.tokenizer_training == "replicas" else []
    gen_jobs = [generator_job(spec, g, paths, refs[g.tokenizer.config.data.image_size]) for g in gens]
    if spec.budget_runs == "longest":
        branch_jobs(gens, gen_jobs)
    packs = pack_jobs(spec, gens, gen_jobs, paths) if spec.generator_training == "replicas" else []
    jobs, seen = [], set()
    for job in [*(r for r in refs.values() if r is not None), *tok_packs, *tok_jobs, *packs, *gen_jobs]:
        # two grid points with one config are one job: a tokenizer shared by cells that differ only in
        # their generator overrides trains and encodes once
        if job.id not in seen:
            seen.add(job.id)
            jobs.append(job)
    return Plan(paths.root, dependency_order(jobs), toks, gens, gen_jobs, tok_jobs)


def dependency_order(jobs: list[Job]) -> list[Job]:
    """The jobs in their order, except that each comes after the jobs it depends on (a stable topological
    sort): the sequential runner takes them as listed. A budget cut from a generator's longest run that
    trains alone (not in a replica pack, e.g. a +REPA variant) depends on that run, which the grid lists
    after it (budgets ascend)."""
    ids = {j.id for j in jobs}
    placed: set[str] = set()
    out, pending = [], list(jobs)
    while pending:
        # the first ready job of the remaining order, then look again from the start (keeps the order stable)
        job = next((j for j in pending if all(d in placed or d not in ids for d in j.deps)), None)
        if job is None:
            raise ValueError(f"study plan: jobs depend on each other in a cycle: {[j.id for j in pending][:4]}")
        out.append(job)
        placed.add(job.id)
        pending.remove(job)
    return out


__all__ = ["Plan", "build_plan", "dependency_order"]
