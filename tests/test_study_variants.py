"""Generator variants as study cells: a tokenizer entry's `generator_overrides` (twostage/study/spec.py).

An entry with generator overrides is a cell of its own (cell hash, label), trains its generators with the
overrides, shares the tokenizer job of every entry with the same tokenizer config, and never packs with
another generator config; specs without the field keep their job ids and cells exactly.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from twostage.config import ConfigError
from twostage.study.jobs import config_without, generator_cell, tokenizer_cell, tokenizer_id
from twostage.study.packs import pack_key
from twostage.study.plan import build_plan
from twostage.study.spec import load_spec, resolve_grid

KL = {"preset": "kl_fmnist_f4d8", "overrides": ["model.spec=f4d4", "vf.enabled=false"]}
REPA = ["repa.enabled=true", "repa.layer=1", "repa.projector_dim=32"]
DDT = ["model.ddt.enabled=true", "model.ddt.width=32", "model.ddt.depth=1", "model.ddt.heads=2"]


def spec_dict(*entries, **changes) -> dict:
    return {"name": "v", "tokenizer": {"steps": 50},
            "tokenizers": list(entries) or [KL, {**KL, "generator_overrides": REPA}],
            "generators": {"dit": {"preset": "dit_fmnist", "sizes": ["tiny", "mini"], "cfg": 1.5}},
            "budgets": [100, 200], **changes}


def test_generator_overrides_are_validated_before_any_work_and_name_the_entry():
    with pytest.raises(ConfigError, match=r"tokenizers\[1\] \(kl_fmnist_f4d8\).generator_overrides: model.size is a "
                                          r"study axis \(generators.<kind>.sizes\)"):
        load_spec(spec_dict(KL, {**KL, "generator_overrides": ["model.size=mini"]}))
    with pytest.raises(ConfigError, match=r"train.steps is a study axis \(budgets\)"):
        load_spec(spec_dict(KL, {**KL, "generator_overrides": ["train.steps=5"]}))
    with pytest.raises(ConfigError, match="'repa' must look like section.key=value"):
        load_spec(spec_dict(KL, {**KL, "generator_overrides": ["repa"]}))
    # an unknown key and a value the config refuses: found when the grid resolves, naming entry and fix
    with pytest.raises(ConfigError, match=r"tokenizers\[1\] \(kl_fmnist_f4d8\).generator_overrides=.*did you mean "
                                          r"'enabled'"):
        resolve_grid(load_spec(spec_dict(KL, {**KL, "generator_overrides": ["repa.enabeld=true"]})))
    with pytest.raises(ConfigError, match=r"size tiny.*tokenizers\[1\].*repa.layer=3.*choose 1..2"):
        resolve_grid(load_spec(spec_dict(KL, {**KL, "generator_overrides": ["repa.enabled=true", "repa.layer=3"]})))


def test_variant_is_its_own_cell_with_a_label_and_shares_the_tokenizer_job(tmp_path):
    s = load_spec(spec_dict(KL, {**KL, "generator_overrides": REPA},
                            {**KL, "generator_overrides": DDT, "label": "kl f4d4 + DiT-DDT"},
                            seeds={"tokenizer": [0, 1], "generator": [0, 1], "design": "paired"}))
    plan = build_plan(s, tmp_path)
    labels = {tokenizer_cell(t): t.label for t in plan.tokenizers}
    assert sorted(labels.values()) == ["kl f4d4", "kl f4d4 + DiT-DDT", "kl f4d4 / dit +REPA"]  # three cells
    # one tokenizer config, two seeds: two tokenizer jobs (trained and encoded once), labelled as the run
    toks = [j for j in plan.jobs if j.kind == "tokenizer"]
    assert len(toks) == 2 and {j.label for j in toks} == {"kl f4d4"}
    assert len({tokenizer_id(t) for t in plan.tokenizers}) == 2 and len(plan.tokenizers) == 6
    # every generator of a cell carries its overrides, depends on the shared tokenizer job and is its own run
    gens = list(zip(plan.generators, plan.generator_jobs))
    assert len(gens) == 3 * 2 * 2 * 2 and len({j.id for _, j in gens}) == len(gens)
    for g, job in gens:
        assert g.config.repa.enabled == ("REPA" in g.tokenizer.label)
        assert g.config.model.ddt.enabled == ("DDT" in g.tokenizer.label)
        assert job.deps == [f"tok-{tokenizer_id(g.tokenizer)}"] and job.label.startswith(g.tokenizer.label + " / ")
        assert all(o in job.stages[0].argv for o in g.tokenizer.generator_overrides)
    # the same grid point with and without the variant: same tokenizer run, different run id and cell
    plain, repa = (next(j.id for g, j in gens if g.size == "tiny" and g.budget == 100 and g.seed == 0
                        and g.tokenizer.index == i) for i in (0, 1))
    assert plain != repa
    assert len({generator_cell(g) for g, _ in gens}) == 3 * 2 * 2  # cells x sizes x budgets


def test_replicas_never_pack_two_generator_configs_and_longest_budgets_still_branch(tmp_path):
    kl16 = {"preset": "kl_fmnist_f4d8", "overrides": ["model.spec=f4d16", "vf.enabled=false"]}
    entries = (KL, {**KL, "overrides": ["model.spec=f4d4"]}, {**KL, "generator_overrides": REPA},
               {**KL, "generator_overrides": DDT}, kl16)
    # paired seeds: the runs of one entry read the caches of two tokenizer seeds; a DiT normalizes each with
    # its own cache's statistics (Task.replica_tensors), so they pack, but with REPA (a decoder of each
    # cache's tokenizer: registry replicas_share_cache_if) they cannot, and train as plain runs
    paired = build_plan(load_spec(spec_dict(*entries, seeds={"tokenizer": [0, 1], "generator": [0, 1], "design": "paired"},
                                            generator_training="replicas", budget_runs="longest")), tmp_path / "p")
    paired_packs = [j for j in paired.jobs if j.kind == "pack"]
    # per size: the two d4 entries (one code shape, one generator config) together, +DDT, d16; not +REPA
    assert len(paired_packs) == 2 * 3
    for pack in paired_packs:
        members = [g for g, j in zip(paired.generators, paired.generator_jobs) if pack.id in j.deps]
        assert not any(g.config.repa.enabled for g in members)
        assert {g.tokenizer.seed for g in members} == {0, 1}  # two tokenizer runs, two caches, one pack
    repa_runs = [j for g, j in zip(paired.generators, paired.generator_jobs) if g.config.repa.enabled]
    assert repa_runs and all(j.stages[0].name in ("train", "branch") for j in repa_runs)
    s = load_spec(spec_dict(*entries, seeds={"tokenizer": [0], "generator": [0, 1]},
                            generator_training="replicas", budget_runs="longest"))
    plan = build_plan(s, tmp_path)
    packs = [j for j in plan.jobs if j.kind == "pack"]
    # per size: the two generator seeds of each (tokenizer run, variant) pack together; the two d4 entries
    # (one code shape, one generator config, their own caches) share a pack, as AR runs of two tokenizers
    # do; never two variants (+REPA, +DDT: other generator configs)
    assert len(packs) == 2 * 4
    for pack in packs:
        members = [g for g, j in zip(plan.generators, plan.generator_jobs) if pack.id in j.deps and g.budget == 200]
        configs = {json.dumps(config_without(g.config, "seed"), sort_keys=True, default=str) for g in members}
        assert len(configs) == 1 and len({pack_key(g) for g in members}) == 1
        cells = {tokenizer_cell(g.tokenizer) for g in members}
        assert len(cells) == (2 if members[0].tokenizer.config.model.spec == "f4d4"
                              and not members[0].tokenizer.generator_overrides else 1)
        argv = pack.stages[0].argv
        outs = argv[argv.index("--out") + 1: argv.index("--seeds")]
        assert len(outs) == len(members) == 2 * len(cells)
        variant = members[0].tokenizer.generator_overrides
        assert all(o in argv for o in variant) and ("repa.enabled=true" in argv) == (variant == REPA)
    # the 100-step budgets branch from the 200-step run of their own variant
    for g, job in zip(plan.generators, plan.generator_jobs):
        if g.budget == 100:
            assert job.stages[0].name == "branch"
            source = job.stages[0].argv[2]
            top = next(j for h, j in zip(plan.generators, plan.generator_jobs) if str(j.folder) == source)
            longer = next(h for h, j in zip(plan.generators, plan.generator_jobs) if j is top)
            assert longer.budget == 200 and tokenizer_cell(longer.tokenizer) == tokenizer_cell(g.tokenizer)


def test_no_op_variant_and_clashing_labels_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizers\[0\] and tokenizers\[1\] train the same generator runs.*"
                                          "remove one entry or change its generator_overrides"):
        build_plan(load_spec(spec_dict(KL, {**KL, "generator_overrides": ["repa.enabled=false"]})), tmp_path)
    with pytest.raises(ConfigError, match=r"tokenizers\[0\] and tokenizers\[1\] are different cells with one label "
                                          "'same': give one of them a `label`"):
        build_plan(load_spec(spec_dict({**KL, "label": "same"}, {**KL, "generator_overrides": REPA, "label": "same"})),
                   tmp_path)
    # without generator overrides two entries of one config stay what they were: one cell, one set of runs
    plan = build_plan(load_spec(spec_dict(KL, KL)), tmp_path)
    assert len({tokenizer_cell(t) for t in plan.tokenizers}) == 1 and len({j.id for j in plan.jobs}) == 1 + 4


# ids, cells and labels of the shipped claim specs' tokenizer and generator jobs, computed with the code of
# 4cf2ac3 (before generator_overrides and pretrained tokenizers existed): sha256 of json.dumps([job ids,
# tokenizer cells, generator cells, job labels])[:16]. Pack jobs are left out: which runs stack follows
# the replica rules (twostage/study/packs.py), not the identity of a run.
BEFORE = {"study_crt": ("76851f18aa583678", 42), "study_continuous": ("0194bedccfd1829f", 60)}
# spec edits made since (they change the runs, so their ids): undone here to compare the code's ids
SINCE = {"study_crt": ["tokenizer.steps=2000", "tokenizer.overrides=[train.ckpt_every=500,monitor.val_images=1000]",
                       "generators.ar.overrides=[sample.grid_at_checkpoint=16]"],
         "study_continuous": ["tokenizer.steps=1000", "tokenizer.overrides=[train.ckpt_every=250,monitor.val_images=1000]"]}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_specs_without_variants_keep_their_job_ids_and_cells(name, tmp_path):
    plan = build_plan(load_spec(name, SINCE.get(name, [])), tmp_path)
    jobs = [j for j in plan.jobs if j.kind != "pack"]
    ids = [j.id for j in jobs]
    record = [ids, [tokenizer_cell(t) for t in plan.tokenizers], [generator_cell(g) for g in plan.generators],
              [j.label for j in jobs]]
    assert (hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16], len(ids)) == BEFORE[name]
