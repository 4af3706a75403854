"""Study specs: validation before any work, the grid, job ids keyed by config hash, the presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from twostage.config import PRESET_DIR, ConfigError
from twostage.study.jobs import generator_id, tokenizer_id
from twostage.study.plan import build_plan
from twostage.study.spec import load_spec, resolve_grid

BASE = {
    "name": "t",
    "tokenizers": [{"preset": "vq_fmnist_f4"}, {"preset": "vq_fmnist_f4", "overrides": ["crt.enabled=true"]},
                   {"preset": "kl_fmnist_f4d8", "overrides": ["model.spec=f4d4", "vf.enabled=false"]}],
    "generators": {"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny", "mini", "small"]},
                   "dit": {"preset": "dit_fmnist", "sizes": ["tiny"], "cfg": 1.5, "sample_steps": 20}},
    "budgets": [100, 200],
    "tokenizer": {"steps": 50},
}


def spec(**changes):
    return load_spec({**BASE, **changes})


def test_unknown_keys_name_the_closest_valid_key():
    with pytest.raises(ConfigError, match="unknown config key 'budget'.*did you mean 'budgets'"):
        load_spec({**BASE, "budget": [1]})
    with pytest.raises(ConfigError, match="'tokenizer.stpes'.*did you mean 'steps'"):
        load_spec(BASE, ["tokenizer.stpes=3"])
    # a bad override inside one grid point is found before anything runs, and names the point
    bad = {**BASE, "tokenizers": [{"preset": "vq_fmnist_f4", "overrides": ["model.codebok_size=256"]}]}
    with pytest.raises(ConfigError, match=r"tokenizers\[0\] \(vq_fmnist_f4\).*did you mean 'codebook_size'"):
        resolve_grid(load_spec(bad))
    with pytest.raises(ConfigError, match="generators.ar.*size"):
        resolve_grid(load_spec({**BASE, "generators": {**BASE["generators"], "ar": {"preset": "ar_fmnist_tiny",
                                                                                    "sizes": ["huge"]}}}))
    with pytest.raises(ConfigError, match="data.nme"):
        resolve_grid(spec(data={"nme": "x"}))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="budgets"):
        spec(budgets=[100, 100])
    with pytest.raises(ConfigError, match="sample_steps"):
        spec(generators={"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"], "sample_steps": 3}})
    with pytest.raises(ConfigError, match="no generators.dit"):
        resolve_grid(spec(generators={"ar": BASE["generators"]["ar"]}))
    with pytest.raises(ConfigError, match="kind is 'ar'"):
        resolve_grid(spec(generators={**BASE["generators"], "dit": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"]}}))


def test_grid_multiplies_the_axes_and_resolves_each_config(tmp_path):
    toks, gens = resolve_grid(spec())
    assert len(toks) == 3 and len(gens) == 2 * 3 * 2 + 1 * 1 * 2
    assert [t.label for t in toks] == ["vq f4 K1024", "vq f4 K1024 +CRT", "kl f4d4"]
    assert toks[1].config.crt.enabled and toks[2].config.model.latent_channels == 4
    assert all(t.config.train.steps == 50 for t in toks) and toks[0].tokens_per_image == 64
    dit = [g for g in gens if g.kind == "dit"]
    assert [g.config.train.steps for g in dit] == [100, 200] and dit[0].config.model.size == "tiny"
    assert gens[0].config.model.size == "tiny" and gens[2].config.model.size == "mini"
    plan = build_plan(spec(), tmp_path)
    assert len(plan.jobs) == 3 + 14 and plan.jobs[0].id.startswith("tok-")
    sample = plan.generator_jobs[-1].stages[1].argv
    assert sample[sample.index("--cfg") + 1] == "1.5" and sample[sample.index("--steps") + 1] == "20"


def test_paired_seed_design_trains_the_ith_generator_seed_on_the_ith_tokenizer_seed():
    ar_only = {"tokenizers": BASE["tokenizers"][:2], "generators": {"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"]}}}
    crossed = resolve_grid(spec(**ar_only, seeds={"tokenizer": [0, 1, 2], "generator": [5, 6, 7]}))
    paired = resolve_grid(spec(**ar_only, seeds={"tokenizer": [0, 1, 2], "generator": [5, 6, 7], "design": "paired"}))
    assert len(crossed[0]) == len(paired[0]) == 6
    assert len(crossed[1]) == 2 * 3 * 3 * 2 and len(paired[1]) == 2 * 3 * 2
    assert {(g.tokenizer.seed, g.seed) for g in paired[1]} == {(0, 5), (1, 6), (2, 7)}
    assert all(g.config.train.seed == g.seed for g in paired[1])
    # a paired run is the crossed run of the same seeds: same config, same job id
    ids = {generator_id(g, spec(**ar_only)) for g in crossed[1]}
    assert {generator_id(g, spec(**ar_only)) for g in paired[1]} <= ids
    with pytest.raises(ConfigError, match="as many generator seeds"):
        spec(seeds={"tokenizer": [0, 1, 2], "generator": [0, 1], "design": "paired"})
    with pytest.raises(ConfigError, match="seeds.design='zip'"):
        spec(seeds={"design": "zip"})


def test_job_ids_are_stable_and_follow_the_config():
    a, b = resolve_grid(spec()), resolve_grid(spec())
    assert [tokenizer_id(t) for t in a[0]] == [tokenizer_id(t) for t in b[0]]
    assert len({tokenizer_id(t) for t in a[0]}) == 3
    ids = [generator_id(g, spec()) for g in a[1]]
    assert len(set(ids)) == len(ids) and ids == [generator_id(g, spec()) for g in b[1]]
    # changing the tokenizer changes its id and the ids of every generator trained on it
    other = spec(tokenizer={"steps": 51})
    toks2, gens2 = resolve_grid(other)
    assert tokenizer_id(toks2[0]) != tokenizer_id(a[0][0]) and generator_id(gens2[0], other) != ids[0]
    # the same config written differently (preset value repeated as an override) is the same job
    same = spec(tokenizers=[{"preset": "vq_fmnist_f4", "overrides": ["model.codebook_size=1024"]}])
    assert tokenizer_id(resolve_grid(same)[0][0]) == tokenizer_id(a[0][0])
    # the cache settings are part of a generator's identity, not of its tokenizer's
    limited = spec(tokenizer={"steps": 50, "encode_train_limit": 1000})
    t3, g3 = resolve_grid(limited)
    assert tokenizer_id(t3[0]) == tokenizer_id(a[0][0]) and generator_id(g3[0], limited) != ids[0]


@pytest.mark.parametrize("name", ["study_demo", "study_crt", "study_tokens", "study_codebook", "study_continuous",
                                  "study_representation"])
def test_presets_resolve(name, tmp_path):
    s = load_spec(name)
    plan = build_plan(s, tmp_path)
    assert plan.generator_jobs and (PRESET_DIR / f"{name}.yaml").read_text().startswith("#")
    text = Path(PRESET_DIR / f"{name}.yaml").read_text()
    assert f"twostage study run {name}" in text or name == "study_demo"
