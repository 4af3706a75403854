"""`study run` end to end on tiny random data: jobs, markers, resume after an interruption, the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from test_faults_support import npz_splits
from twostage import cli
from twostage.config import ConfigError
from twostage.generators.dit.model import ffn_hidden, forward_flops_per_image
from twostage.study import runner as runner_mod
from twostage.study.jobs import generator_id, job_done, tokenizer_id
from twostage.study.plan import build_plan
from twostage.study.runner import StageError, run_parallel, run_study
from twostage.study.spec import load_spec
from twostage.study.table import SCHEMA, read_table

TRAIN = {"batch_size": 4, "ckpt_every": 1000, "log_every": 1, "num_workers": 0, "device": "cpu", "progress": False}
TINY_VQ = ["model.base_channels=8", "model.channel_mult=[1,2,2]", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
           "model.z_channels=8", "model.norm_groups=4", "model.codebook_size=32", "model.code_dim=4",
           "loss.perceptual=none", "loss.disc_channels=8", "loss.disc_layers=2", "monitor.grid_images=4"]


def tiny_spec(data) -> dict:
    return {
        "name": "tiny",
        "data": {"name": "npz", "root": str(data), "image_size": 16},
        "tokenizer": {"steps": 2, "overrides": [*TINY_VQ, *[f"train.{k}={v}" for k, v in TRAIN.items()]],
                      "encode_batch_size": 16, "num_workers": 0, "encode_train_limit": 24},
        "tokenizers": [{"preset": "vq_fmnist_f4"},
                       {"preset": "vq_fmnist_f4", "overrides": ["crt.enabled=true", "crt.width=32", "crt.heads=2"],
                        "label": "crt"}],
        "generators": {"ar": {"preset": "ar_fmnist_tiny", "sizes": ["tiny"], "cfg": 2.0, "overrides": [
            *[f"train.{k}={v}" for k, v in {**TRAIN, "batch_size": 8}.items()], "val.batch_size=5",
            "sample.grid_at_checkpoint=0"]}},
        "budgets": [2, 3],
        "sample": {"num": 12, "batch_size": 12},
        "eval": {"reference": f"npz:{data}:val", "reference_max_images": 10, "batch_size": 12, "recon_max_images": 6,
                 "recon_perceptual": False},
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return npz_splits(tmp_path_factory.mktemp("study_data"), train=32, val=12)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TWOSTAGE_CACHE", str(tmp_path / "cache"))  # reference statistics stay in the test


def test_interrupted_study_resumes_without_redoing_finished_stages(data, tmp_path, monkeypatch):
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(data)))
    out = tmp_path / "out"
    calls: list[list[str]] = []
    real = runner_mod.invoke

    def interrupted(argv, root):
        if argv[:2] == ["generator", "sample"]:  # die in the first generator job, after its training
            raise KeyboardInterrupt
        calls.append(argv)
        real(argv, root)

    monkeypatch.setattr(runner_mod, "invoke", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["study", "run", str(spec_file), "--out", str(out)])
    spec = load_spec(spec_file)
    plan = build_plan(spec, out)
    assert [j.kind for j in plan.jobs] == ["reference", "tokenizer", "tokenizer", *["generator"] * 4]
    assert all(job_done(j, out) for j in plan.jobs[:3])  # reference and both tokenizers finished
    first = plan.generator_jobs[0]
    assert (first.marker("train")).is_file() and not first.marker("sample").is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("done/*.json")}
    assert len(calls) == 1 + 2 * 4 + 1  # stats, 2 x (train, encode x2, recon), the generator's train
    assert read_table(out).num_rows == 0  # the interrupted run still wrote its (empty) table
    assert cli.main(["study", "table", str(out)]) == 0 and read_table(out).num_rows == 0

    calls.clear()

    def counted(argv, root):
        calls.append(argv)
        real(argv, root)

    monkeypatch.setattr(runner_mod, "invoke", counted)
    assert cli.main(["study", "run", str(spec_file), "--out", str(out)]) == 0
    # only the missing stages ran: sample + eval of the first generator, then 3 whole generator jobs
    assert [c[:2] for c in calls] == [["generator", "sample"], ["eval", "gen"]] + \
        [["generator", "train"], ["generator", "sample"], ["eval", "gen"]] * 3
    for path, mtime in mtimes.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was redone"
    log = (out / "commands.log").read_text().splitlines()
    assert sum("generator train" in line for line in log) == 4  # the interrupted train is not repeated

    table = read_table(out)
    assert table.schema.equals(SCHEMA) and table.num_rows == 4
    rows = table.to_pylist()
    assert [r["tokenizer_label"] for r in rows] == ["vq f4 K32"] * 2 + ["crt"] * 2
    assert [r["train_steps"] for r in rows] == [2, 3, 2, 3]
    assert [r["crt"] for r in rows] == [False, False, True, True]
    for r in rows:
        assert r["run_id"] == generator_id(plan.generators[rows.index(r)], spec)
        assert r["tokenizer_id"] == tokenizer_id(plan.generators[rows.index(r)].tokenizer)
        assert r["tokens_per_image"] == 16 and r["downsample"] == 4 and r["codebook_size"] == 32
        assert r["latent_channels"] is None and r["vf"] is False and r["generator_kind"] == "ar"
        assert r["tokens_seen"] == r["train_steps"] * 8 * 16
        assert r["compute"] == pytest.approx(r["flops_per_token"] * r["tokens_seen"])
        model = json.loads((out / r["generator_run"] / "model.json").read_text())
        assert r["params"] == model["non_embedding_parameters"]
        assert len(r["val_loss_per_position"]) == 16 and r["val_loss"] == pytest.approx(np.mean(r["val_loss_per_position"]))
        assert r["gfd_name"] == "FD-EffNetLite0" and r["gfd"] > 0 and 0 <= r["precision"] <= 1
        assert r["gfd_inf"] is not None and r["kid"] is not None and r["kid_stderr"] >= 0  # FDinf, KID columns
        assert r["rfd"] > 0 and r["psnr"] > 0 and 0 < r["codebook_usage"] <= 1
        assert 0 < r["code_entropy"] <= np.log(r["codebook_size"])  # unigram entropy of the val cache, nats
        assert json.loads(r["gen_protocol"])["num_samples"] == 12
        assert json.loads(r["recon_protocol"])["num_samples"] == 6
        assert (out / r["samples_npz"]).is_file() and r["wall_s_generator"] > 0 and r["wall_s_tokenizer"] > 0
    assert (out / "results.csv").is_file()

    # a third run does nothing at all, and a changed sample count redoes only sampling + eval
    calls.clear()
    run_study(spec, out)
    assert calls == []
    spec2 = load_spec(spec_file, ["sample.num=8"])
    run_study(spec2, out)
    assert [c[:2] for c in calls] == [["generator", "sample"], ["eval", "gen"]] * 4
    assert all(json.loads(r)["num_samples"] == 8 for r in read_table(out).column("gen_protocol").to_pylist())


def test_failing_stage_names_its_command(data, tmp_path):
    spec = tiny_spec(data)
    spec["tokenizers"] = spec["tokenizers"][:1]
    spec["tokenizer"]["overrides"].append("data.root=/nonexistent/folder")
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(StageError, match="twostage tokenizer train vq_fmnist_f4"):
        run_study(load_spec(spec_file, ["eval.reference_max_images=null"]), tmp_path / "out", gpus=1)


def test_parallel_scheduler_respects_dependencies(data, tmp_path):
    plan = build_plan(load_spec(tiny_spec(data)), tmp_path / "out")
    started: list[tuple[str, int]] = []
    finished: set[str] = set()

    def launch(job, gpu):
        assert all(d in finished for d in job.deps), job.id
        started.append((job.id, gpu))
        finished.add(job.id)

    run_parallel(plan, [0, 1], launch)
    assert sorted(j for j, _ in started) == sorted(j.id for j in plan.jobs)
    assert {g for _, g in started} <= {0, 1}

    def broken(job, gpu):
        if job.kind == "tokenizer":
            raise StageError(f"{job.id} failed")
        finished.add(job.id)

    finished.clear()
    with pytest.raises(StageError, match="failed"):
        run_parallel(plan, [0, 1], broken)
    assert not any(j.startswith("gen-") for j in finished)  # nothing ran on a failed tokenizer's cache


def test_parallel_scheduler_keeps_going_past_a_failed_job(data, tmp_path):
    """One failed tokenizer stops only the jobs that need it: the other tokenizer's generator runs still
    run (a failure must not waste the rest of a time-limited allocation), and the error is raised."""
    plan = build_plan(load_spec(tiny_spec(data)), tmp_path / "out")
    tokenizers = [j.id for j in plan.jobs if j.kind == "tokenizer"]
    assert len(tokenizers) >= 2
    bad = tokenizers[0]
    finished: set[str] = set()

    def launch(job, gpu):
        if job.id == bad:
            raise StageError(f"{job.id} failed")
        finished.add(job.id)

    with pytest.raises(StageError, match=f"{bad} failed"):
        run_parallel(plan, [0], launch)
    needs_bad = {j.id for j in plan.jobs if bad in j.deps}
    assert needs_bad and not needs_bad & finished
    assert finished == {j.id for j in plan.jobs} - needs_bad - {bad}


def test_tokenizer_seeds_train_as_one_stacked_run_and_the_study_reads_them_as_runs(data, tmp_path, monkeypatch):
    """tokenizer_training: replicas: the seeds of each tokenizer config train as one `tpack` job (tokenizer
    train --out R1 R2 --seeds --pack), and the tokenizer jobs then only encode and evaluate; the table has
    every run, each tokenizer's wall time includes its share of the pack, and a config the packs cannot
    train (a discriminator starting within the run) is refused when the plan is built."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_study import stage_times, tokenizer_flops

    spec = tiny_spec(data)
    spec["seeds"] = {"tokenizer": [0, 1], "generator": [0, 1], "design": "paired"}
    spec["tokenizer_training"] = "replicas"
    spec["budgets"] = [2]
    out = tmp_path / "out"
    plan = build_plan(load_spec(spec), out)
    tpacks = [j for j in plan.jobs if j.kind == "tokenizer-pack"]
    assert len(tpacks) == 2 and len([j for j in plan.jobs if j.kind == "tokenizer"]) == 4  # baseline, +CRT; 2 seeds
    spec["tokenizers"] = spec["tokenizers"][:1]  # what follows runs: the baseline's two seeds are enough
    plan = build_plan(load_spec(spec), out)
    tpacks = [j for j in plan.jobs if j.kind == "tokenizer-pack"]
    toks = [j for j in plan.jobs if j.kind == "tokenizer"]
    for pack in tpacks:
        argv = pack.stages[0].argv
        assert argv[:2] == ["tokenizer", "train"] and "--pack" in argv and not any(a.startswith("train.seed=") for a in argv)
        assert argv[argv.index("--seeds") + 1:argv.index("--pack")] == ["0", "1"]
    for job in toks:
        assert "train" not in [s.name for s in job.stages] and job.deps[0] in {p.id for p in tpacks}
    # the same spec with separate tokenizer jobs has the same tokenizer job ids (the runs are the same runs)
    separate = build_plan(load_spec({**spec, "tokenizer_training": "separate"}), tmp_path / "sep")
    assert {j.id for j in separate.jobs if j.kind == "tokenizer"} == {j.id for j in toks}

    run_study(load_spec(spec), out)
    table = read_table(out)
    assert table.num_rows == 2  # 1 tokenizer x 2 paired seeds x 1 size x 1 budget
    assert min(table.column("wall_s_tokenizer").to_pylist()) > 0  # the pack's share is counted
    for job in toks:
        run = job.folder
        assert (run / "config.yaml").is_file() and (run / "eval" / "recon.json").is_file()
        assert json.loads((run / "run.json").read_text())["replica_of"]["replicas"] == 2
    assert stage_times(plan)["stages"]["tokenizer training"]["stages"] == 1  # the pack's train stage
    assert tokenizer_flops(plan)[1] == 2  # every packed run counted as trained

    bad = tiny_spec(data)
    bad["seeds"] = spec["seeds"]
    bad["tokenizer_training"] = "replicas"
    bad["tokenizer"]["overrides"] = [*bad["tokenizer"]["overrides"], "loss.disc_start=1"]
    with pytest.raises(ConfigError, match="disc_start"):
        build_plan(load_spec(bad), tmp_path / "bad")


def test_dry_run_lists_jobs(data, tmp_path, capsys):
    spec_file = tmp_path / "study.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(data)))
    assert cli.main(["study", "run", str(spec_file), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "7 jobs" in out and "0/4 stages done" in out and not (tmp_path / "o").exists()


def test_table_schema_types():
    names = dict(zip(SCHEMA.names, SCHEMA.types))
    assert names["val_loss_per_position"] == pa.list_(pa.float64())
    assert names["codebook_size"] == pa.int64() and names["crt"] == pa.bool_() and names["compute"] == pa.float64()


def test_continuous_study_row(data, tmp_path):
    spec = tiny_spec(data)
    spec["tokenizers"] = [{"preset": "kl_fmnist_f4d8", "overrides": [
        "model.spec=f4d4", "model.base_channels=8", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
        "model.norm_groups=4", "loss.perceptual=none", "loss.disc_channels=8", "loss.disc_layers=2", "vf.enabled=false",
        "monitor.grid_images=4", *[f"train.{k}={v}" for k, v in TRAIN.items()]]}]
    spec["tokenizer"]["overrides"] = []
    spec["generators"] = {"dit": {"preset": "dit_fmnist", "sizes": ["tiny"], "cfg": 1.5, "sample_steps": 2, "overrides": [
        *[f"train.{k}={v}" for k, v in {**TRAIN, "batch_size": 8}.items()], "val.batch_size=4", "val.max_samples=8",
        "sample.grid_at_checkpoint=0"]}}
    spec["budgets"] = [2]
    # two slots (one GPU, two jobs on it) take the several-GPU path: each job in its own
    # `study run DIR/study.yaml --only JOB` subprocess (here on the CPU; CUDA_VISIBLE_DEVICES names a
    # GPU that is not there)
    plan = run_study(load_spec(spec), tmp_path / "out", gpus=1, jobs_per_gpu=2)
    assert sorted(p.stem for p in (tmp_path / "out" / "logs").glob("*.log")) == sorted(j.id for j in plan.jobs)
    (row,) = read_table(tmp_path / "out").to_pylist()
    assert row["tokenizer_label"] == "kl f4d4" and row["tokenizer_kind"] == "kl" and row["generator_kind"] == "dit"
    assert row["latent_channels"] == 4 and row["codebook_size"] is None and row["vf"] is False and row["crt"] is False
    assert row["codebook_usage"] is None and row["psnr"] is not None and row["val_loss_per_position"] is None
    assert 0 <= row["latent_uniformity_gini"] <= 1 and 0 < row["latent_uniformity_entropy"] <= 1
    assert row["val_loss"] > 0 and row["gfd"] > 0 and row["tokens_per_image"] == 16
    model = json.loads((tmp_path / "out" / row["generator_run"] / "model.json").read_text())
    assert row["params"] == model["non_embedding_parameters"]
    # training FLOPs per image (3 x forward) / tokens per image (tiny: 2 layers, width 64, 4 channels, patch 1, 4x4)
    per_image = 3 * forward_flops_per_image(2, 64, ffn_hidden(64, 4.0), 4, 1, (4, 4))
    assert row["flops_per_token"] * 16 == pytest.approx(per_image) == model["train_flops_per_token"] * 16
    assert row["compute"] == pytest.approx(per_image * 2 * 8)  # 2 steps x batch 8
    assert json.loads(row["gen_protocol"])["steps"] == 2
    assert job_done(plan.generator_jobs[0], tmp_path / "out")


def test_replicas_study_trains_each_grid_point_once_and_gives_the_same_runs(data, tmp_path, monkeypatch):
    """generator_training: replicas packs the runs of one grid point (both tokenizers have one code
    shape, two generator seeds) into one `generator train ... --pack` job; the runs, their ids and the
    table are those of a separate study."""
    base = tiny_spec(data)
    spec = load_spec({**base, "generator_training": "replicas", "seeds": {"generator": [0, 1]}, "budgets": [2],
                      "tokenizers": base["tokenizers"][:1]})
    out = tmp_path / "packed"
    calls: list[list[str]] = []
    real = runner_mod.invoke

    def counted(argv, root):
        calls.append(argv)
        real(argv, root)

    monkeypatch.setattr(runner_mod, "invoke", counted)
    run_study(spec, out)
    plan = build_plan(spec, out)
    assert [j.kind for j in plan.jobs] == ["reference", "tokenizer", "pack", *["generator"] * 2]
    trains = [c for c in calls if c[:2] == ["generator", "train"]]
    assert len(trains) == 1 and trains[0].count("--seeds") == 1
    pack = plan.jobs[2]
    assert all(pack.id in j.deps and [s.name for s in j.stages] == ["sample", "eval"] for j in plan.generator_jobs)
    rows = read_table(out).to_pylist()
    assert len(rows) == 2 and sorted((r["tokenizer_label"], r["generator_seed"]) for r in rows) == \
        [("vq f4 K32", 0), ("vq f4 K32", 1)]
    for r, gen in zip(rows, plan.generators):
        assert r["run_id"] == generator_id(gen, spec) and r["val_loss"] > 0 and r["gfd"] > 0
        assert r["wall_s_generator"] > 0
        assert json.loads((out / r["generator_run"] / "run.json").read_text())["replica_of"]["replicas"] == 2
    # the same spec trained separately names the same runs; both tokenizers (one code shape) share packs
    separate = build_plan(load_spec({**base, "seeds": {"generator": [0, 1]}, "budgets": [2]}), out)
    assert [j.id for j in separate.generator_jobs][:2] == [j.id for j in plan.generator_jobs]
    both = build_plan(load_spec({**base, "generator_training": "replicas", "seeds": {"generator": [0, 1]},
                                 "budgets": [2]}), out)
    assert [j.stages[0].argv.count("--out") for j in both.jobs if j.kind == "pack"] == [1]
    assert len(next(j for j in both.jobs if j.kind == "pack").deps) == 2  # both tokenizers' jobs


def test_budgets_from_the_longest_run_give_the_same_table(data, tmp_path):
    """budget_runs: longest trains each grid point's largest budget once (checkpoints at the others) and
    branches the shorter budgets from it: on the CPU the table equals the separate study's, number for
    number; combined with replicas, only the longest runs are packed."""
    import shutil

    base = {**tiny_spec(data), "budgets": [3, 2]}
    one = {**base, "tokenizers": base["tokenizers"][:1]}
    separate, longest = tmp_path / "separate", tmp_path / "longest"
    run_study(load_spec(one), separate)
    for folder in ("reference", "tokenizers", "caches"):  # the same jobs, done: only the generators differ
        shutil.copytree(separate / folder, longest / folder)
    spec = load_spec({**one, "budget_runs": "longest"})
    run_study(spec, longest)
    plan = build_plan(spec, longest)
    by_budget = {g.budget: j for g, j in zip(plan.generators, plan.generator_jobs)}
    assert [s.name for s in by_budget[2].stages] == ["branch", "sample", "eval"] and by_budget[3].id in by_budget[2].deps
    assert "train.ckpt_at=[2]" in by_budget[3].stages[0].argv
    log = (longest / "commands.log").read_text()
    assert log.count("generator train") == 1 and log.count("generator branch") == 1
    a, b = read_table(separate).to_pylist(), read_table(longest).to_pylist()
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["run_id"] == y["run_id"] and x["train_steps"] == y["train_steps"]
        assert x["val_loss"] == y["val_loss"] and x["gfd"] == y["gfd"] and x["compute"] == y["compute"]
    packed = build_plan(load_spec({**base, "budget_runs": "longest", "generator_training": "replicas"}), tmp_path / "p")
    packs = [j for j in packed.jobs if j.kind == "pack"]
    assert len(packs) == 1 and "train.ckpt_at=[2]" in packs[0].stages[0].argv  # the two tokenizers' 3-step runs
    branched = [j for j in packed.generator_jobs if j.stages[0].name == "branch"]
    assert len(branched) == 2 and all(packs[0].id in j.deps for j in branched)  # not waiting for sampling
    with pytest.raises(ConfigError, match="depends on the run's length"):
        build_plan(load_spec({**base, "budget_runs": "longest", "generators": {"ar": {
            **base["generators"]["ar"], "overrides": [*base["generators"]["ar"]["overrides"], "optim.schedule=cosine",
                                                     "optim.warmup_steps=0"]}}}), tmp_path / "c")


def test_plan_lists_every_job_after_the_jobs_it_depends_on(tmp_path):
    """The sequential runner takes the jobs as listed. In study_representation the +REPA generators train
    alone (no replica pack) and their shorter budget is cut from their longest run, which the grid lists
    after it (budgets ascend): the plan must put the run first (a CPU pre-flight of the spec stopped there)."""
    from twostage.study.jobs import Job
    from twostage.study.plan import dependency_order

    spec = load_spec("study_representation", ["budgets=[2,3]", "seeds.tokenizer=[0,1]", "seeds.generator=[0,1]"])
    plan = build_plan(spec, tmp_path / "study")
    position = {j.id: i for i, j in enumerate(plan.jobs)}
    branched = [j for j in plan.jobs if any(d.startswith("gen-") for d in j.deps)]
    assert branched, "no budget is cut from a run that trains alone: the case this test is about is gone"
    assert all(position[d] < position[j.id] for j in plan.jobs for d in j.deps)
    a, b, c = (Job(i, "generator", tmp_path, [], deps) for i, deps in (("a", ["c"]), ("b", []), ("c", ["b"])))
    assert [j.id for j in dependency_order([a, b, c])] == ["b", "c", "a"]
    with pytest.raises(ValueError, match="cycle"):
        dependency_order([a, Job("c", "generator", tmp_path, [], ["a"])])
