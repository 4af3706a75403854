"""Runs trained as stacked replicas: the study's `pack` jobs (generators) and `tpack` jobs (tokenizers).

With `generator_training: replicas` in a study spec, the generator runs that differ only in their seed
or in their tokenizer (same kind, code shape and data; e.g. a tokenizer's seeds, or a tokenizer with and
without a regularizer) train as one joint run: `twostage generator train ... --out R1 R2 ... --seeds
...  --pack DIR/packs/<id>` (twostage/engine/replicas.py; on a GPU K small replicas cost about one run).

Nothing else changes: each run keeps its folder DIR/generators/<run_id> and its id (the hash of its own
config), so a packed and a separate study produce the same runs; the generator jobs then only sample and
evaluate, after their pack job has trained them.

With `tokenizer_training: replicas`, the seeds of one VQ tokenizer config (the same entry, every seed) train
as one joint run the same way: `twostage tokenizer train PRESET ... --out R1 R2 R3 --seeds ... --pack
DIR/packs/<id>` (twostage/tokenizers/run.py train_replicas); each tokenizer job keeps its folder and id
and then only encodes and evaluates.
"""

from __future__ import annotations

from twostage import config as configlib
from twostage import registry
from twostage.study.jobs import Job, Paths, Stage, config_without, generator_id, tokenizer_id
from twostage.study.spec import ResolvedGenerator, ResolvedTokenizer, StudySpec

def pack_key(gen: ResolvedGenerator) -> str:
    """Runs with equal keys can be replicas of one joint run: the generator config apart from its seed,
    and what fixes the shape of the tokenizer's cache (kind, tokens per image, codebook size or latent
    channels, data settings)."""
    tok = gen.tokenizer
    cols = tok.config.study_columns()
    shape = {"kind": tok.kind, "tokens": tok.tokens_per_image, "codebook_size": cols.get("codebook_size"),
             "latent_channels": cols.get("latent_channels"), "data": configlib.to_dict(tok.config.data)}
    if registry.generator_kind(gen.kind).replicas_share_cache(gen.config):  # seeds of one tokenizer run only
        shape["tokenizer_run"] = tokenizer_id(tok)
    return configlib.config_hash({"generator": config_without(gen.config, "seed"), "preset": gen.preset,
                                  "cache_shape": shape})


def _without_seed_override(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("train.seed=")]


def _seedless_tokenizer_command(job: Job) -> list[str] | None:
    """A tokenizer job's `tokenizer train` command up to --out, without its train.seed override: equal
    for the seeds of one config (which then stack as replicas); None for a job that does not train."""
    train = next((s for s in job.stages if s.name == "train"), None)
    return None if train is None else _without_seed_override(train.argv[:train.argv.index("--out")])


def pack_jobs(spec: StudySpec, gens: list[ResolvedGenerator], gen_jobs: list[Job], paths: Paths) -> list[Job]:
    """One training job per group of runs with one pack key (in grid order); the generator jobs lose
    their train stage and depend on their pack job instead, and so do budgets branched from them
    (study/branches.py: they need the trained folder, not the run's sampling). Changed in place."""
    groups: dict[str, list[int]] = {}
    for i, gen in enumerate(gens):
        if any(s.name == "train" for s in gen_jobs[i].stages):  # not a budget branched from a longer run
            groups.setdefault(pack_key(gen), []).append(i)
    packs = []
    for members in groups.values():
        chosen, seen = [], set()
        for i in members:  # one grid point listed twice (same config) is one run
            if gen_jobs[i].id not in seen:
                seen.add(gen_jobs[i].id)
                chosen.append(i)
        if len(chosen) == 1:  # nothing to stack: a replica alone costs more than the plain run
            continue
        first = gens[chosen[0]]
        pid = configlib.config_hash({"runs": [generator_id(gens[i], spec) for i in chosen]})
        folder = paths.root / "packs" / pid
        tids = [tokenizer_id(gens[i].tokenizer) for i in chosen]
        train = next(s for s in gen_jobs[chosen[0]].stages if s.name == "train").argv
        argv = [*_without_seed_override(train[:train.index("--tokens")]),  # the run's own command, e.g. with train.ckpt_at
                "--tokens", *[str(paths.cache(t, "train")) for t in tids],
                "--val-tokens", *[str(paths.cache(t, "val")) for t in tids],
                "--out", *[str(gen_jobs[i].folder) for i in chosen],
                "--seeds", *[str(gens[i].seed) for i in chosen], "--pack", str(folder)]
        deps = list(dict.fromkeys(f"tok-{t}" for t in tids))
        # a generator variant (a spec entry's generator_overrides) packs only with runs of its own config
        variant = f" {' '.join(first.tokenizer.generator_overrides)}" if first.tokenizer.generator_overrides else ""
        label = f"{first.label}{variant}, {len(chosen)} replicas"
        pack = Job(f"pack-{pid}", "pack", folder, [Stage("train", argv)], deps=deps, label=label)
        packs.append(pack)
        for i in members:
            job = gen_jobs[i]
            job.stages = [s for s in job.stages if s.name != "train"]
            job.deps = [pack.id, *[d for d in job.deps if not d.startswith("tok-")]]
    trained_by = {gen_jobs[i].id: p.id for p in packs for i in range(len(gens)) if p.id in gen_jobs[i].deps}
    for job in gen_jobs:
        if job.stages and job.stages[0].name == "branch":
            job.deps = list(dict.fromkeys(trained_by.get(d, d) for d in job.deps))
    return packs


def tokenizer_pack_jobs(toks: list[ResolvedTokenizer], tok_jobs: list[Job], paths: Paths) -> list[Job]:
    """One `tpack` training job per tokenizer config trained with several seeds; its tokenizer jobs lose
    their train stage and depend on it. A config with one seed trains as before. Changed in place."""
    from twostage.tokenizers.run import check_replicas

    groups: dict[str, list[int]] = {}
    commands: dict[str, list[str]] = {}
    for i, job in enumerate(tok_jobs):
        command = _seedless_tokenizer_command(job)
        if command is not None:
            key = configlib.config_hash(command)
            groups.setdefault(key, []).append(i)
            commands[key] = command
    packs = []
    for key, members in groups.items():
        chosen, seen = [], set()
        for i in members:  # one config listed twice (e.g. for two generator variants) is one run
            if tok_jobs[i].id not in seen:
                seen.add(tok_jobs[i].id)
                chosen.append(i)
        if len(chosen) == 1:
            continue
        first = toks[chosen[0]]
        outs = [tok_jobs[i].folder for i in chosen]
        seeds = [toks[i].seed for i in chosen]
        pid = configlib.config_hash({"tokenizer_runs": [tok_jobs[i].id for i in chosen]})
        folder = paths.root / "packs" / pid
        check_replicas(first.config, outs, seeds, folder)  # before any work: kind, discriminator start, folders
        argv = [*commands[key], "--out", *map(str, outs), "--seeds", *map(str, seeds), "--pack", str(folder)]
        pack = Job(f"tpack-{pid}", "tokenizer-pack", folder, [Stage("train", argv)],
                   label=f"{first.run_label}, {len(chosen)} seeds stacked")
        packs.append(pack)
        for i in members:
            job = tok_jobs[i]
            job.stages = [s for s in job.stages if s.name != "train"]
            job.deps = [pack.id, *job.deps]
    return packs


__all__ = ["pack_key", "pack_jobs", "tokenizer_pack_jobs"]
