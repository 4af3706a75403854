"""Tables of the H100 Fashion-MNIST session (run.sh) from the files it brought back.

    mkdir -p /tmp/fm && tar xzf results.tgz -C /tmp/fm
    python results/h100_fmnist/summarize.py /tmp/fm --out results/h100_fmnist

Writes summary.json (every number with the file it came from) and README.md (tables). Nothing here
is typed by hand: rerunning this script on the same folder regenerates both files exactly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
from pathlib import Path

DISCRETE = ["vq_f4", "vq_f4_crt"]
CONTINUOUS = ["kl_f4d4", "kl_f4d4_vf", "kl_f4d16", "kl_f4d16_vf"]


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def _metric(result: dict | None, prefix: str):
    if not result:
        return None
    return next((v for k, v in result["metrics"].items() if k.startswith(prefix)), None)


def training(run: Path) -> dict:
    rows = _rows(run / "metrics.jsonl")
    times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]
    return {"steps": max((r["step"] for r in rows), default=0),
            "step_time_s": statistics.median(times) if times else None,
            "wall_s": (rows[-1]["time"] - rows[0]["time"]) if len(rows) > 1 else None}


def tokenizer(run: Path) -> dict:
    recon = _json(run / "eval" / "recon.json")
    out = {"train": training(run), "recon_step": recon["protocol"]["extra"]["tokenizer_step"] if recon else None,
           "rFD": _metric(recon, "rFD"), "rFD_name": next((k for k in (recon or {"metrics": {}})["metrics"]
                                                            if k.startswith("rFD")), None),
           "PSNR": _metric(recon, "PSNR"), "SSIM": _metric(recon, "SSIM"),
           "codebook_usage": _metric(recon, "codebook_usage"), "recon_images": recon["protocol"]["num_samples"] if recon else None}
    probe = _json(run / "eval" / "probe.json")
    if probe:
        out["probe"] = {view: {"val_error": r["val_error"], "train_error": r["train_error"], "steps": r["steps"],
                               "train_images": r["train_images"], "val_images": r["val_images"]}
                        for view, r in probe["views"].items()}
    uni = _json(run / "eval" / "uniformity.json")
    if uni:
        out["uniformity"] = uni
    return out


def generator(run: Path) -> dict:
    rows = _rows(run / "metrics.jsonl")
    gen = _json(run / "eval" / "gen.json")
    model = _json(run / "model.json") or {}
    return {"train": training(run), "val_loss": _last(rows, "val/loss"), "params": model.get("params"),
            "gFD": _metric(gen, "FD-"), "gFD_name": next((k for k in (gen or {"metrics": {}})["metrics"]
                                                          if k.startswith("FD-")), None),
            "precision": _metric(gen, "Precision"), "recall": _metric(gen, "Recall"),
            "num_samples": gen["protocol"]["num_samples"] if gen else None,
            "cfg": gen["protocol"]["cfg_scale"] if gen else None, "sampler": gen["protocol"]["sampler"] if gen else None,
            "sampler_steps": gen["protocol"]["steps"] if gen else None}


def collect(runs: Path, dest: Path) -> None:
    """Copy each run's small evidence (config, eval JSON, metrics log, last grid) next to the tables."""
    if dest.exists():
        shutil.rmtree(dest)
    for name in ["commands.log", "device.txt"]:
        if (runs / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(runs / name, dest / name)
    for run in sorted(p for p in runs.iterdir() if (p / "config.yaml").is_file()):
        out = dest / run.name
        (out / "eval").mkdir(parents=True, exist_ok=True)
        for name in ["config.yaml", "metrics.jsonl", "model.json", "samples.png"]:
            if (run / name).is_file():
                shutil.copy2(run / name, out / name)
        for f in sorted((run / "eval").glob("*.json")):
            shutil.copy2(f, out / "eval" / f.name)
        grids = sorted((run / "samples").glob("*.png"))
        if grids:
            shutil.copy2(grids[-1], out / grids[-1].name)


def _f(v, digits=3) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="the extracted results.tgz")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    r = args.runs
    summary = {"device": (r / "device.txt").read_text().strip() if (r / "device.txt").is_file() else None,
               "discrete": {n: {"tokenizer": tokenizer(r / n), "ar": generator(r / f"ar_{n}")} for n in DISCRETE},
               "continuous": {n: {"tokenizer": tokenizer(r / n), "dit": generator(r / f"dit_{n}")} for n in CONTINUOUS},
               "bench": {b: _json(r / f"{b}.json") for b in ("bench_ar_train", "bench_ar_sample", "bench_dit")}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    lines = ["# Fashion-MNIST 32x32 on one H100: VQ +/- CRT with AR, KL-VAE +/- VF with LightningDiT", "",
             "Generated by `python results/h100_fmnist/summarize.py RUNS --out results/h100_fmnist` from the files",
             "that `bash results/h100_fmnist/run.sh` (one device call) brought back; `commands.log` lists every",
             "command it ran, with its start time. Device: " + str(summary["device"]).replace("\n", ", "), ""]
    lines += ["## Discrete: VQ f4 (8x8 = 64 tokens, K=1024), baseline vs CRT, and an AR `small` on each", "",
              "| tokenizer | trained to | evaluated at | s/step | PSNR | SSIM | rFD | usage | probe err pre-quant"
              " | probe err codes | AR steps | AR val CE | gFD | precision | recall |", "|" + "---|" * 15]
    for n, d in summary["discrete"].items():
        t, g = d["tokenizer"], d["ar"]
        p = t.get("probe", {})
        lines.append(f"| {n} | {t['train']['steps']} | {_f(t['recon_step'])} | {_f(t['train']['step_time_s'])} | "
                     f"{_f(t['PSNR'], 2)} | {_f(t['SSIM'])} | {_f(t['rFD'], 2)} | {_f(t['codebook_usage'])} | "
                     f"{_f(p.get('pre_quant', {}).get('val_error'), 4)} | {_f(p.get('quantized', {}).get('val_error'), 4)} | "
                     f"{g['train']['steps']} | {_f(g['val_loss'])} | {_f(g['gFD'], 2)} | {_f(g['precision'])} | "
                     f"{_f(g['recall'])} |")
    lines += ["", "## Continuous: KL-VAE f4 with d = 4 / 16, with and without the VF loss, and a LightningDiT `mini` on each", "",
              "| tokenizer | steps | s/step | PSNR | SSIM | rFD | density std | Gini | norm. entropy | DiT steps"
              " | DiT val loss | gFD | precision | recall |", "|" + "---|" * 14]
    for n, d in summary["continuous"].items():
        t, g = d["tokenizer"], d["dit"]
        u = t.get("uniformity", {})
        lines.append(f"| {n} | {t['train']['steps']} | {_f(t['train']['step_time_s'])} | {_f(t['PSNR'], 2)} | "
                     f"{_f(t['SSIM'])} | {_f(t['rFD'], 2)} | {_f(u.get('density_std'), 4)} | {_f(u.get('gini'), 4)} | "
                     f"{_f(u.get('normalized_entropy'), 4)} | {g['train']['steps']} | {_f(g['val_loss'])} | "
                     f"{_f(g['gFD'], 2)} | {_f(g['precision'])} | {_f(g['recall'])} |")
    any_gen = next((g for d in summary["discrete"].values() for g in [d["ar"]] if g["gFD_name"]), None)
    lines += ["", "Metric names: " + str(next((d["tokenizer"]["rFD_name"] for d in summary["discrete"].values()
                                                  if d["tokenizer"]["rFD_name"]), "rFD")) +
              " (val reconstructions vs val), " + str(any_gen["gFD_name"] if any_gen else "FD") +
              " (samples vs fashion-mnist:test); protocols in each run's eval/*.json.", ""]
    lines += ["## Benchmarks", "", "```"]
    for b, v in summary["bench"].items():
        lines.append(f"{b}: " + (json.dumps(v) if v else "not finished in the call"))
    lines += ["```", ""]
    lines += ["`trained to`: the last logged step of the run (the call's deadline stops training); `evaluated at`:",
              "the checkpoint every later stage used — the same step for the tokenizers compared. `s/step`: median",
              "training step time while the runs of one part shared the GPU. Probe: held-out next-latent l2 error",
              "of a fresh 2-layer causal transformer fitted on the frozen tokenizer's l2-normalized latents",
              "(`twostage tokenizer probe`). Per-run configs, eval JSON (with protocols), training logs and the",
              "last reconstruction grid are in `runs/`.", ""]
    (args.out / "README.md").write_text("\n".join(lines))
    collect(r, args.out / "runs")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
