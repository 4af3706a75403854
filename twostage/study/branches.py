"""A grid point's budgets from one run: the study's `budget_runs: longest`.

Generator runs that differ only in `train.steps` (same tokenizer, size, seed, everything else) are the
same run cut at different steps when the learning-rate schedule does not depend on the run's length
(twostage/generators/branch.py checks this exactly; the presets warm up, then hold the rate). With
`budget_runs: longest` only the longest budget B trains, with extra checkpoints at the other budgets
(`train.ckpt_at`), and each shorter budget's job starts with `twostage generator branch RUN_B --step b
--out RUN_b` instead of training: a budget grid b1 < ... < B costs B steps instead of b1 + ... + B.

The run ids and folders stay those of separate runs (the longest run's config gains only
`train.ckpt_at`, which changes no number), so the results table is the same; a schedule that depends
on the run's length (cosine) is refused when the plan is built, before anything runs.
"""

from __future__ import annotations

import json

from twostage import config as configlib
from twostage.config import ConfigError
from twostage.study.jobs import Job, Stage, config_without, tokenizer_id
from twostage.study.spec import ResolvedGenerator

def budget_key(gen: ResolvedGenerator) -> str:
    """Runs with equal keys differ only in their budget (train.steps)."""
    return configlib.config_hash({"generator": config_without(gen.config, "steps"), "preset": gen.preset,
                                  "tokenizer": tokenizer_id(gen.tokenizer)})


def branch_jobs(gens: list[ResolvedGenerator], gen_jobs: list[Job]) -> None:
    """Change the plan's generator jobs in place: the longest budget of each group trains with
    checkpoints at the shorter budgets; the shorter budgets branch from it (see the module docstring)."""
    from twostage.generators.branch import prefix_mismatch

    groups: dict[str, list[int]] = {}
    for i, gen in enumerate(gens):
        groups.setdefault(budget_key(gen), []).append(i)
    for members in groups.values():
        longest = max(members, key=lambda i: gens[i].budget)
        top, job = gens[longest], gen_jobs[longest]
        shorter = sorted({gens[i].budget for i in members} - {top.budget})
        if not shorter:
            continue
        for b in shorter:
            why = prefix_mismatch(top.config, b)
            if why is not None:
                raise ConfigError(f"budget_runs: longest needs budgets that are prefixes of one run, but for "
                                  f"{top.label} ({top.tokenizer.label}) {why}; use budget_runs: separate")
        train = job.stages[0]
        assert train.name == "train", train.name
        cut = train.argv.index("--tokens")
        extra = f"train.ckpt_at={json.dumps(sorted(set(top.config.train.ckpt_at) | set(shorter)))}"
        train.argv = [*train.argv[:cut], extra, *train.argv[cut:]]
        for i in members:
            if gens[i].budget == top.budget:
                continue
            short = gen_jobs[i]
            branch = Stage("branch", ["generator", "branch", str(job.folder), "--step", str(gens[i].budget),
                                      "--out", str(short.folder)])
            short.stages = [branch, *[s for s in short.stages if s.name != "train"]]
            short.deps = [job.id, *[d for d in short.deps if not d.startswith("tok-")]]


__all__ = ["budget_key", "branch_jobs"]
