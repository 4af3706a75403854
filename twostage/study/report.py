"""`twostage study report DIR [--out DIR/report]`: verdicts, fits, frontiers and figures from DIR/results.parquet.
(`study report DIR1 DIR2 ... --out OUT`: runs of one spec with other seeds in one analysis, pooling.py.)

Writes OUT/report.html (self-contained: figures and sample grids as base64 data URIs, inline CSS, no
scripts, fonts or links to fetch, so it opens offline and can be mailed), OUT/fits.json (cells with
their intervals, every verdict, variance components, every fit with its intervals, the frontiers, the
input table's sha256), OUT/summary.md (short, for committing under results/) and the figures as
OUT/*.png. The same table and options give the same files: nothing records a date or a path of the
machine.

Replicates (rows that differ only in their seeds) are aggregated per cell (generator_cell): mean and
95% interval over seeds, the evaluation's own noise apart (twostage/study/replicates.py). Tokenizers
are compared per generator (kind, size, budget) on paired seeds (verdicts.py), and the compute laws
are fitted to cell means with intervals from a bootstrap over whole seeds (seedfits.py). The report
opens with what the study found, one line per question with its evidence; a table of one seed per
cell still renders, saying "1 seed: no interval" and naming no winner.

Analysed series: val_loss separately per generator kind (AR cross-entropy in nats/token and the DiT
flow loss are different quantities), gFD (and FD-infinity, KID when the table has them) separately
per gfd_name (an FD under another network or protocol is another metric). Within a series, one law
per tokenizer cell.

Each tokenizer's training curves (validation rFD, PSNR, codebook usage against step, one line per
seed) are read from its run folders (twostage/study/curves.py) with a verdict on whether its rFD had
plateaued; a tokenizer still improving at the end is also a warning, since its comparisons then
measure training length too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq

import twostage
from twostage.common.atomic import atomic_write, write_text_atomic
from twostage.common.errors import UserError
from twostage.study import plots
from twostage.study.curves import TokenizerCurves, tokenizer_curves
from twostage.study.frontier import finite, pareto_rfd_gfd, tokenizer_labels
from twostage.study.pooling import pool_rows
from twostage.study.protocols import COMPARABILITY, protocol_summary, rfd_name
from twostage.study.reconstruction import tokenizer_comparisons, tokenizer_values
from twostage.study.render import findings, render_html, render_summary
from twostage.study.replicates import GENERATION, aggregate, metric_name, normalise, series_components
from twostage.study.seedfits import fit_series
from twostage.study.stats import mean_interval
from twostage.study.verdicts import compare_at_matched_compute, compare_cells, headline

log = logging.getLogger(__name__)

REQUIRED = ("run_id", "tokenizer_id", "compute")
MAX_GRIDS = 12
KIND_LOSS = {"ar": "val loss (AR cross-entropy, nats/token)", "dit": "val loss (DiT flow loss)"}


def load_rows(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / "results.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (write it with `twostage study run`)")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; see the contract in twostage/study/__init__.py")
    return table.to_pylist()


def _design(rows: list[dict[str, Any]]) -> dict[str, Any]:
    seeds = {s: sorted({r[f"{s}_seed"] for r in rows}) for s in ("tokenizer", "generator", "eval")}
    # paired (spec seeds.design): each tokenizer run carries one generator seed, and not the same one for all
    per_tokenizer_run: dict[tuple, set] = {}
    for r in rows:
        per_tokenizer_run.setdefault((r["tokenizer_cell"], r["tokenizer_seed"]), set()).add(r["generator_seed"])
    paired = (len(seeds["generator"]) > 1 and len(seeds["tokenizer"]) > 1
              and all(len(g) == 1 for g in per_tokenizer_run.values()))
    return {"rows": len(rows), "tokenizer_cells": len({r["tokenizer_cell"] for r in rows}),
            "generator_cells": len({(r["generator_cell"], r["tokenizer_cell"]) for r in rows}),
            "generator_runs": len({r["run_id"] for r in rows}), "seeds": seeds,
            "seed_design": "paired" if paired else "crossed"}


def _pareto(rows: list[dict[str, Any]], main: dict | None, labels: dict[str, str]) -> list[dict[str, Any]]:
    """pareto_rfd_gfd over tokenizer cells: rFD averaged over tokenizer seeds, gFD the best cell mean;
    both with their intervals over seeds for the figure."""
    rfd_ci = {tc: mean_interval(list(v.values())) for tc, v in tokenizer_values(rows, "rfd").items()}
    cells = {c.key: c for c in (main["cells"] if main else [])}
    flat = [{"tokenizer_id": c.tokenizer_cell, "run_id": c.key, "compute": c.compute, "gfd": c.mean,
             "rfd": rfd_ci[c.tokenizer_cell].mean if c.tokenizer_cell in rfd_ci else None} for c in cells.values()]
    flat += [{"tokenizer_id": tc, "run_id": None, "compute": None, "gfd": None,
              "rfd": rfd_ci[tc].mean if tc in rfd_ci else None}
             for tc in labels if not any(c.tokenizer_cell == tc for c in cells.values())]
    points = pareto_rfd_gfd(flat)
    for p in points:
        i, best = rfd_ci.get(p["tokenizer_id"]), cells.get(p["best_run_id"])
        p.update({"rfd_low": i.low if i else None, "rfd_high": i.high if i else None, "tokenizer_seeds": i.n if i else 0,
                  "gfd_low": best.interval.low if best else None, "gfd_high": best.interval.high if best else None,
                  "gfd_seeds": best.interval.n if best else 0, "best_generator_cell": p["best_run_id"]})
    return points


CONTEXT_GAIN = "AR context gain (unigram entropy − val loss, nats/token)"


def _context_gain(rows: list[dict[str, Any]], labels: dict[str, str]) -> dict | None:
    """Per AR budget, tokenizers compared on code_entropy - val_loss (higher: more gained from context),
    as the generation series are (verdicts only: no law is fitted to it). None without code entropies."""
    gain = [{**r, "context_gain": r["code_entropy"] - r["val_loss"]} for r in rows
            if r.get("generator_kind") == "ar" and finite(r.get("code_entropy")) and finite(r.get("val_loss"))]
    if not gain:
        return None
    cells = aggregate(gain, "context_gain")
    comparisons = compare_cells(cells, "context_gain", labels)
    return {"metric": "context_gain", "name": CONTEXT_GAIN, "cells": cells, "comparisons": comparisons,
            "headline": headline(comparisons)}


def analyze(rows: list[dict[str, Any]], *, n_boot: int = 1000, seed: int = 0, fit_points: str = "frontier") -> dict:
    """Every series with its cells (mean and interval over seeds), pairwise verdicts per budget,
    variance components, laws fitted to cell means with seed-bootstrap intervals, the fitted optimum
    and empirical envelope; the rFD-gFD frontier, protocols and warnings. fit_points: "frontier"
    fits each tokenizer's lower envelope of cell means (a compute-optimal law, as smaller generators
    plateau), "all" every cell."""
    rows = normalise(rows)
    labels = tokenizer_labels([{"tokenizer_id": r["tokenizer_cell"], "tokenizer_label": r.get("tokenizer_label")}
                               for r in rows])
    gfd_names = sorted({r["gfd_name"] for r in rows if r.get("gfd_name")})
    parts = [("val_loss", k, KIND_LOSS.get(k, f"val loss ({k})"), "generator_kind")
             for k in sorted({str(r.get("generator_kind")) for r in rows})]
    parts = [(m, n, metric_name(m, n), "gfd_name") for n in gfd_names for m in GENERATION] + parts
    series, warnings = [], []
    for metric, part, name, col in parts:
        mine = [r for r in rows if str(r.get(col)) == part and finite(r.get(metric)) and finite(r.get("compute"))]
        if not mine:
            continue
        cells = aggregate(mine, metric)
        sf = fit_series(cells, labels, {"metric": metric, "series": part}, n_boot=n_boot, seed=seed,
                        fit_points=fit_points)
        warnings += [f"{name}, {labels[tc]}: {f.message}" for tc, f in sf["fits"].items() if not f.ok]
        ns = sorted({c.interval.n for c in cells})
        if len(ns) > 1:
            warnings.append(f"{name}: cells have {ns[0]} to {ns[-1]} seeds (runs missing or failed): "
                            "intervals differ in width and unpaired seeds are left out of paired verdicts")
        comparisons = compare_cells(cells, metric, labels)
        series.append({"metric": metric, "part": part, "name": name, "rows": mine, "cells": cells, **sf,
                       "comparisons": comparisons, "headline": headline(comparisons),
                       "matched": compare_at_matched_compute(cells, metric, labels),
                       "components": series_components(cells)})
    if len(gfd_names) > 1:
        warnings.append("several gfd_name values: generation FDs of different networks are analysed separately")
    points: dict[tuple, set[str]] = {}
    for r in rows:
        points.setdefault((r["tokenizer_cell"], r.get("generator_kind"), r.get("generator_size"), r.get("train_steps")),
                          set()).add(r["generator_cell"])
    split = sorted(f"{labels[k[0]]} {k[1]} {k[2]} {k[3]} steps" for k, v in points.items() if len(v) > 1)
    if split:
        warnings.append(f"{len(split)} grid point(s) have several generator_cell values ({split[0]}, ...): their "
                        "seeds are analysed as separate cells, so their verdicts compare a tokenizer with itself")
    gen = protocol_summary([r.get("gen_protocol") for r in rows])
    for k, vals in gen.items():
        if k.split(".")[-1] in COMPARABILITY and len(vals) > 1:
            warnings.append(f"generation protocol field {k} differs between runs ({len(vals)} values): "
                            "their gFDs are not comparable")
    first_of = {}
    for r in rows:
        first_of.setdefault(r["tokenizer_id"], r.get("recon_protocol"))
    main = next((s for s in series if s["metric"] == "gfd" and s["part"] == (gfd_names or [None])[0]), None)
    gname = gfd_names[0] if gfd_names else "gFD"
    a = {"labels": labels, "series": series, "warnings": warnings, "gen_protocol": gen, "design": _design(rows),
         "recon_protocol": protocol_summary(first_of.values()), "pareto": _pareto(rows, main, labels),
         "gfd_name": gname, "rfd_name": rfd_name(rows, gfd_names[0] if gfd_names else "FD"), "rows": rows,
         "options": {"bootstrap_resamples": n_boot, "seed": seed, "fit_points": fit_points},
         "stage1": tokenizer_comparisons(rows, labels), "context": _context_gain(rows, labels)}
    a["findings"] = findings(a)
    return a


def _stem(s: dict) -> str:
    return "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in f"{s['metric']}_{s['part']}")


def _figures(a: dict, out: Path) -> dict[str, Path]:
    L, rows = a["labels"], a["rows"]
    colors = plots.tokenizer_colors(list(L))
    figures: dict[str, Path] = {}
    for s in a["series"]:
        cells = [{"tokenizer_id": c.tokenizer_cell, "generator_size": c.generator_size, "compute": c.compute,
                  "mean": c.mean, "low": c.interval.low, "high": c.interval.high, "seeds": list(c.runs.values())}
                 for c in s["cells"]]
        figures[f"{s['name']} vs compute"] = plots.metric_vs_compute(
            out / f"{_stem(s)}_vs_compute.png", cells, s["fits"], s["name"], f"{s['name']} vs training compute", L,
            colors)
    for s in a["series"]:
        diffs = [{"label": f"{c.group[1]} {c.group[2]} steps: {c.label_a} − {c.label_b}", "mean": c.diff.mean,
                  "low": c.diff.low, "high": c.diff.high} for c in s["headline"] if c.compared]
        if any(math.isfinite(d["low"]) for d in diffs):
            figures[f"{s['name']}: paired differences"] = plots.differences_plot(
                out / f"{_stem(s)}_differences.png", diffs, f"difference in {s['name']} (95% CI over seeds)",
                f"{s['name']}: best tokenizer vs each other, per budget")
    panels = [{"title": f"optimal tokenizer: {s['name']}", "ylabel": s["name"], "fits": s["fits"],
               "optimal": s["optimal"], "envelope": s["envelope"], "crossovers": s["crossovers"]} for s in a["series"]]
    if panels:
        figures["compute-optimal frontier"] = plots.frontier_plot(out / "frontier.png", panels, L, colors)
    extra = {"validation loss per position": plots.per_position(out / "per_position.png", _curves(rows), L, colors),
             f"{a['rfd_name']} vs {a['gfd_name']}": plots.rfd_vs_gfd(out / "rfd_vs_gfd.png", a["pareto"], a["rfd_name"],
                                                                   a["gfd_name"], L, colors)}
    figures.update({k: v for k, v in extra.items() if v is not None})
    return figures


def _curve_figures(curves: list[TokenizerCurves], out: Path) -> dict[str, Path]:
    """tokenizer cell -> its training-curves figure (tokenizers without any curve get none)."""
    figures = {}
    for c in curves:
        seeds = {s.seed: {**s.val, "train_usage": s.train_usage} for s in c.seeds}
        stem = "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in c.cell)
        path = plots.training_curves(out / f"tokenizer_curves_{stem}.png", f"{c.label}: {c.verdict}",
                                     c.rfd_name or "rFD", seeds)
        if path is not None:
            figures[c.cell] = path
    return figures


def _curves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per tokenizer cell, the per-position losses of every run of its largest-compute cell."""
    cells: dict[tuple[str, str], dict[tuple[int, int], dict]] = {}
    for r in rows:
        pos = r.get("val_loss_per_position")
        if pos is not None and len(pos) > 0 and finite(r.get("compute")):
            cells.setdefault((r["tokenizer_cell"], r["generator_cell"]), {})[(r["tokenizer_seed"], r["generator_seed"])] = r
    best: dict[str, tuple[float, str]] = {}
    for (tc, gc), runs in cells.items():
        c = max(r["compute"] for r in runs.values())
        if tc not in best or (c, gc) > best[tc]:
            best[tc] = (c, gc)
    out = []
    for tc, (c, gc) in sorted(best.items()):
        runs = [r for _, r in sorted(cells[(tc, gc)].items())]
        if len({len(r["val_loss_per_position"]) for r in runs}) == 1:
            out.append({"tokenizer_id": tc, "compute": c, "generator_label": runs[0].get("generator_label") or gc,
                        "runs": [list(r["val_loss_per_position"]) for r in runs]})
    return out


def _grids(a: dict, directory: Path, kept: Path) -> list[tuple[bytes, str]]:
    """One sample grid per tokenizer cell (its best cell by mean gFD), from one seed: a row per class
    built from the samples file, else the class grid an earlier report built from it (`kept`/CELL.png,
    written each time one is built: a committed study keeps these, not its samples), else the grid PNG
    the sampler wrote."""
    L, grids = a["labels"], []
    main = next((s for s in a["series"] if s["metric"] == "gfd" and s["part"] == a["gfd_name"]), None)
    cells = {c.key: c for c in main["cells"]} if main else {}
    picks = sorted((p for p in a["pareto"] if p["best_run_id"]), key=lambda p: (p["best_gfd"], p["tokenizer_id"]))
    for p in picks[:MAX_GRIDS]:
        cell = cells[p["best_run_id"]]
        runs = sorted(cell.rows, key=lambda r: (r["tokenizer_seed"], r["generator_seed"], r["eval_seed"]))
        what = f"{L[cell.tokenizer_cell]} — {cell.generator_kind} {cell.generator_size} {cell.train_steps} steps"
        ci = f"{a['gfd_name']} {p['best_gfd']:.4g}" + (f" [{p['gfd_low']:.4g}, {p['gfd_high']:.4g}] over {p['gfd_seeds']} seeds"
                                                     if finite(p["gfd_low"]) else " (1 seed: no interval)")
        seeds = lambda r: f"Seeds tokenizer {r['tokenizer_seed']}, generator {r['generator_seed']}, eval {r['eval_seed']}"
        png, txt = kept / f"{cell.key}.png", kept / f"{cell.key}.txt"
        got = None
        for r in runs:
            made = plots.class_grid(directory / r["samples_npz"]) if r.get("samples_npz") else None
            if made is not None:
                data, shown, total = made
                classes = f"every class ({total})" if shown == total else f"{shown} of {total} classes"
                got = (data, f"{what}; {ci}. {seeds(r)}: one row per class, {classes}")
                with atomic_write(png, "wb") as fh:
                    fh.write(data)
                write_text_atomic(txt, got[1])
                break
        if got is None and png.is_file():
            got = (png.read_bytes(), (txt.read_text() if txt.is_file() else what)
                   + " (the grid kept from the report made beside the samples)")
        for r in runs if got is None else []:
            thumb = plots.grid_thumbnail(directory / r["grid_png"]) if r.get("grid_png") else None
            if thumb is not None:
                got = (thumb, f"{what}; {ci}. {seeds(r)}: the sampler's grid (first samples of the file; the "
                              "samples file was not readable, so not every class may show)")
                break
        if got is None:
            a["warnings"].append(f"sample grid of cell {cell.key} is missing ({runs[0].get('samples_npz')}, "
                                 f"{runs[0].get('grid_png')})")
        else:
            grids.append(got)
    return grids


def _no_nan(x: Any) -> Any:
    """NaN/inf (an interval no bootstrap draw could give) as null: strict JSON readers reject NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def _fits_doc(a: dict, study: str, digest: str) -> dict[str, Any]:
    S = a["series"]
    return {"metadata": {"study": study, "results_sha256": digest, "twostage_version": twostage.__version__,
                         "law": "L(C) = L_min + exp(lambda) * C^alpha, C in FLOPs", **a["options"]},
            "design": a["design"], "findings": [{"section": t, "lines": ls} for t, ls in a["findings"]],
            "fits": [{**f.to_dict(), "seed_ci": s["seed_ci"].get(tc)} for s in S for tc, f in s["fits"].items()],
            "optimal": [{"series": s["name"], "segments": s["optimal"]["segments"], "crossovers": s["crossovers"],
                         "envelope": s["envelope"], "budgets": s["budgets"], "seed_resampling": s.get("resample"),
                         "seed_level": s["level"], "seed_units": s["n_units"]} for s in S],
            "cells": [{"series": s["name"], "metric": s["metric"], **c.brief()} for s in S for c in s["cells"]],
            "verdicts": [{"series": s["name"], **c.to_dict(), "headline": any(c is h for h in s["headline"])}
                         for s in S for c in s["comparisons"]],
            "matched_compute_verdicts": [{"series": s["name"], **c.to_dict()} for s in S for c in s.get("matched", [])],
            "variance_components": [{"series": s["name"], **(s["components"] or {})} for s in S],
            "reconstruction_verdicts": [c.to_dict() for c in a.get("stage1", [])],
            "context_gain_verdicts": [c.to_dict() for c in (a.get("context") or {}).get("comparisons", [])],
            "rfd_vs_gfd": a["pareto"], "tokenizer_curves": [c.brief() for c in a["curves"]],
            "warnings": a["warnings"]}


def build_report(directory: Path | Sequence[Path], out: Path | None = None, *, n_boot: int = 1000, seed: int = 0,
                 fit_points: str = "frontier") -> dict[str, Path]:
    """The report of one study folder, or of several runs of one spec pooled (twostage/study/pooling.py;
    `out` is then required)."""
    directories = [Path(directory)] if isinstance(directory, (str, Path)) else [Path(d) for d in directory]
    directory = directories[0]
    if len(directories) > 1 and out is None:
        raise ValueError("a report over several study folders needs --out (it belongs to none of them)")
    out = Path(out) if out is not None else directory / "report"
    rows_of = [load_rows(d) for d in directories]
    for d, rows in zip(directories, rows_of):
        if not rows:
            raise ValueError(f"{d / 'results.parquet'} has no rows")
    base = directory  # where the rows' run paths start
    if len(directories) > 1:
        rows, digest = pool_rows(directories, rows_of)
        base = Path(".")  # the pooled rows' paths carry their folders
    else:
        rows, digest = rows_of[0], hashlib.sha256((directory / "results.parquet").read_bytes()).hexdigest()
    log.info("%d rows, %d tokenizers; fitting (%d bootstrap resamples per fit)", len(rows),
             len({r["tokenizer_id"] for r in rows}), n_boot)
    a = analyze(rows, n_boot=n_boot, seed=seed, fit_points=fit_points)
    a["curves"] = tokenizer_curves(a["rows"], base, a["labels"])
    a["warnings"] += [f"tokenizer {c.label} was {c.verdict}: its comparisons measure training length too"
                      for c in a["curves"] if c.status == "still improving"]
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(a, out)
    curve_figures = _curve_figures(a["curves"], out)
    grids = _grids(a, base, out / "grids")
    study = str(rows[0].get("study") or directory.name)
    if len(directories) > 1:
        study += f" (pooled: {', '.join(str(d) for d in directories)})"
    paths = {"fits": out / "fits.json", "html": out / "report.html", "summary": out / "summary.md"}
    doc = _fits_doc(a, study, digest)
    paths["fits"].write_text(json.dumps(_no_nan(doc), indent=1, sort_keys=True, allow_nan=False) + "\n")
    paths["html"].write_text(render_html(a, study, digest, figures, grids, curve_figures), encoding="utf-8")
    paths["summary"].write_text(render_summary(a, study, digest), encoding="utf-8")
    return {**paths, **{f"figure:{k}": v for k, v in figures.items()},
            **{f"figure:training curves {a['labels'][k]}": v for k, v in curve_figures.items()}}


def cmd_report(args: argparse.Namespace) -> int:
    try:
        paths = build_report(args.dir, args.out, n_boot=args.bootstrap, seed=args.seed, fit_points=args.fit_points)
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"study report: {err}", file=sys.stderr)
        return 2
    print(paths["html"])
    return 0
