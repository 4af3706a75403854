"""benchmarks/bench_study.py's arithmetic: the elapsed time of overlapping stages, and the training FLOPs
of a study counted from what trained (packs' replicas in; budgets branched from a longer run out)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_study import elapsed, generator_flops, stage_times, tokenizer_flops, tokenizer_timelines  # noqa: E402

from twostage.study.plan import build_plan  # noqa: E402
from twostage.study.spec import load_spec  # noqa: E402


def test_elapsed_is_the_length_of_the_union_of_intervals():
    assert elapsed([]) == 0.0
    assert elapsed([(0.0, 10.0), (5.0, 12.0), (20.0, 25.0)]) == pytest.approx(17.0)
    assert elapsed([(0.0, 10.0), (2.0, 3.0)]) == pytest.approx(10.0)  # nested
    assert elapsed([(5.0, 6.0), (0.0, 1.0)]) == pytest.approx(2.0)  # order does not matter


def test_the_committed_crt_study_counts_its_packed_runs_once_and_its_branches_not_at_all():
    folder = ROOT / "results" / "study_crt"
    plan = build_plan(load_spec(folder / "study.yaml"), folder)
    flops, runs, devices = generator_flops(plan)
    # 3 sizes x 2 tokenizers x 3 paired seeds trained 3000 steps in packs (AR small's too, though it was
    # never evaluated); the 1000-step budgets were cut from them
    assert runs == 18 and set(devices) == {"cuda:0"}
    times = stage_times(plan)["stages"]["generator training"]
    assert 0 < times["elapsed_s"] < times["wall_s"]  # the three packs ran side by side
    per_size = {}
    for gen, job in zip(plan.generators, plan.generator_jobs):
        if gen.budget == 3000:
            per_size.setdefault(gen.size, set()).add(job.id)
    assert {k: len(v) for k, v in per_size.items()} == {"tiny": 6, "mini": 6, "small": 6}
    assert flops > 1e16


def test_tokenizer_flops_of_the_committed_crt_study_match_a_full_batch_count():
    """6 tokenizer runs x 3000 steps; one step at batch 128 counts 1.432 TFLOP (baseline) and 1.510 TFLOP
    (+CRT), results/throughput/2026-12-02/tokenizer_ops_cpu.txt: counting at batch 4 and scaling agrees."""
    folder = ROOT / "results" / "study_crt"
    flops, runs, devices = tokenizer_flops(build_plan(load_spec(folder / "study.yaml"), folder))
    assert runs == 6 and set(devices) == {"cuda:0"}
    assert flops == pytest.approx(3000 * 3 * (1.432e12 + 1.510e12), rel=2e-3)


def test_tokenizer_timelines_of_the_unseen_seed_crt_run_show_the_first_checkpoint_stall():
    """results/study_crt_seeds345 keeps its tokenizers' metrics.jsonl: every run's first 100 steps include
    compilation (> 1 s per step against ~0.1 s after), and the largest pause outside the steps is the first
    checkpoint (step 500, logged at 600), where validation recompiled the in-place compiled model before
    the trainer ran checkpoint side work eagerly."""
    folder = ROOT / "results" / "study_crt_seeds345"
    lines = tokenizer_timelines(build_plan(load_spec(folder / "study.yaml"), folder))
    assert len(lines) == 6
    for x in lines:
        assert x["first_window_steps"] == 100 and x["first_window_step_s"] > 1.0
        assert 0.05 < x["median_step_s"] < 0.2
        assert x["largest_pause_step"] == 600 and x["largest_pause_s"] > 30
        assert x["first_checkpoint_pause_s"] == x["largest_pause_s"]  # ckpt_every 500: the window 500 -> 600
        assert x["pauses_s"] >= x["largest_pause_s"]
