"""How long a study's tokenizer stage will hold one GPU, from its FLOPs and a measured rate: plan device
sessions (30 minutes each, and a study cannot resume across them: its weights do not travel back).

    python benchmarks/estimate_study_cost.py                       # every claim spec in twostage/presets/
    python benchmarks/estimate_study_cost.py study_emoji_tokens --rate 74 --overhead 190

For each spec: the tokenizer configs, training FLOPs per step of each (torch.utils.flop_counter at the
preset's batch, as benchmarks/bench_study.py counts them), the total over configs x seeds x steps, and
the minutes that takes at RATE TFLOP/s plus OVERHEAD seconds. The defaults are measured on one H200
(results/study_tokens/bench_study.txt, 2026-12-02): eight or nine compiled VQ tokenizers sharing the GPU
ran 62 aggregate steps/s of ~1.2 TFLOP each, ~74 TFLOP/s; compilation (~130 s) and the first
checkpoint's pause (~60 s) come on top, once per call. The generator stage is not estimated here
(packs, sampling and evaluation took 6-9 minutes in the Fashion-MNIST studies).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CLAIM_SPECS = ["study_crt", "study_tokens", "study_codebook", "study_continuous", "study_representation",
               "study_emoji_tokens", "study_emoji_crt"]


def tokenizer_cost(spec_name: str) -> tuple[list[tuple[str, float]], int, int]:
    """([(config label, training FLOPs per step)], seeds, steps) of a spec's tokenizer stage."""
    from bench_study import tokenizer_step_flops

    from twostage.study.spec import load_spec, resolve_grid

    spec = load_spec(spec_name)
    first = spec.seeds.tokenizer[:1]
    toks, _ = resolve_grid(load_spec(spec_name, [f"seeds.tokenizer={first}", f"seeds.generator={spec.seeds.generator[:1]}"]))
    configs: dict[tuple, tuple[str, float]] = {}
    for t in toks:
        if t.pretrained:
            continue
        key = (t.kind, t.preset, tuple(o for o in t.overrides if not o.startswith("train.seed=")))
        if key not in configs:
            configs[key] = (t.label, tokenizer_step_flops(t.kind, t.config, t.config.train.steps // 2))
    return list(configs.values()), len(spec.seeds.tokenizer), spec.tokenizer.steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("specs", nargs="*", default=CLAIM_SPECS)
    p.add_argument("--rate", type=float, default=74.0, help="TFLOP/s the shared tokenizer jobs reach together")
    p.add_argument("--overhead", type=float, default=190.0, help="seconds of compilation and first-checkpoint pause")
    args = p.parse_args(argv)
    print(f"# tokenizer stage at {args.rate:g} TFLOP/s + {args.overhead:g} s (one H200, results/study_tokens)")
    for name in args.specs:
        configs, seeds, steps = tokenizer_cost(name)
        total = sum(f for _, f in configs) * seeds * steps
        minutes = (total / (args.rate * 1e12) + args.overhead) / 60
        per_step = ", ".join(f"{label} {f / 1e12:.2f}" for label, f in configs)
        print(f"{name}: {len(configs)} configs x {seeds} seeds x {steps} steps = {total / 1e15:.1f} PFLOP, "
              f"~{minutes:.0f} min; TFLOP per step: {per_step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
