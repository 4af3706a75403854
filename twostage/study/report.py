"""`twostage study report DIR [--out DIR/report]`: fits, frontiers and figures from DIR/results.parquet.

Writes OUT/report.html (self-contained: figures and sample grids as base64 data URIs, inline CSS, no
scripts, fonts or links to fetch, so it opens offline and can be mailed), OUT/fits.json (every fit
with both confidence intervals, the frontiers, the input table's sha256), OUT/summary.md (short,
for committing under results/) and the figures as OUT/*.png. The same table and options give the
same files: nothing records a date or a path of the machine.

Analysed series: val_loss separately per generator kind (AR cross-entropy in nats/token and the DiT
flow loss are different quantities), gFD separately per gfd_name (an FD under another network or
protocol is another metric). Within a series, one law per tokenizer.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import twostage
from twostage.study import plots
from twostage.study.fit import PARAMS, FitResult, fit_law
from twostage.study.frontier import (best_per_budget, finite, lower_envelope, optimal_from_fits,
                                     pareto_rfd_gfd, tokenizer_labels)

log = logging.getLogger(__name__)

REQUIRED = ("run_id", "tokenizer_id", "compute")
# Protocol fields that must agree for numbers to be comparable (docs/methods.md §8 "Protocol record").
COMPARABILITY = ("num_samples", "label_sampling", "feature_network", "feature_checksum", "feature_input_size",
                 "feature_preprocessing", "reference", "reference_stats", "quantization")
SAMPLING = ("sampler", "steps", "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p", "precision")
MAX_GRIDS = 6
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


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def protocol_summary(records: list[Any]) -> dict[str, dict[str, int]]:
    """key -> {value as JSON: count} over the given JSON protocol strings (nested keys dotted)."""
    out: dict[str, dict[str, int]] = {}
    for rec in records:
        if not rec:
            continue
        try:
            flat = _flatten(json.loads(rec) if isinstance(rec, str) else rec)
        except json.JSONDecodeError:
            flat = {"unparsed": rec}
        for k, v in flat.items():
            out.setdefault(k, {})
            value = json.dumps(v, sort_keys=True)
            out[k][value] = out[k].get(value, 0) + 1
    # The fields that decide comparability first, then how samples were drawn, then the rest.
    rank = lambda k: (0 if k.split(".")[-1] in COMPARABILITY else 1 if k.split(".")[-1] in SAMPLING else 2, k)
    return {k: dict(sorted(out[k].items())) for k in sorted(out, key=rank)}


def rfd_name(rows: list[dict[str, Any]], gfd_name: str) -> str:
    """The reconstruction metric's name. From the recon protocol's network when recorded (same rule as
    twostage.metrics.protocol.metric_name, restated so the report does not import torch), else by
    prefixing the generation metric's name."""
    nets = set()
    for r in rows:
        try:
            nets.add(_flatten(json.loads(r.get("recon_protocol") or "{}")).get("feature_network"))
        except json.JSONDecodeError:
            continue
    nets.discard(None)
    if len(nets) == 1:
        net = nets.pop()
        return "rFID" if net == "InceptionV3" else f"rFD-{net}"
    return "r" + gfd_name


def analyze(rows: list[dict[str, Any]], *, n_boot: int = 1000, seed: int = 0, fit_points: str = "frontier") -> dict:
    """All series with their fits, fitted optimum per budget and empirical envelope, plus the rFD-gFD
    frontier and warnings. fit_points: "frontier" fits each tokenizer's lower envelope (runs that beat
    all its cheaper runs: a compute-optimal law, as smaller generators plateau), "all" every run."""
    labels = tokenizer_labels(rows)
    series, warnings = [], []
    parts = [("val_loss", k, KIND_LOSS.get(k, f"val loss ({k})")) for k in sorted({str(r.get("generator_kind")) for r in rows})]
    parts += [("gfd", n, n) for n in sorted({r["gfd_name"] for r in rows if r.get("gfd_name")})]
    for metric, part, name in parts:
        col = "generator_kind" if metric == "val_loss" else "gfd_name"
        mine = [r for r in rows if str(r.get(col)) == part and finite(r.get(metric)) and finite(r.get("compute"))]
        if not mine:
            continue
        fits = {}
        for tid in sorted({r["tokenizer_id"] for r in mine}):
            tok_rows = [r for r in mine if r["tokenizer_id"] == tid]
            pts = lower_envelope(tok_rows, metric) if fit_points == "frontier" else \
                [{"compute": r["compute"], "value": r[metric]} for r in tok_rows]
            key = {"metric": metric, "series": part, "tokenizer_id": tid, "tokenizer_label": labels[tid]}
            fits[tid] = fit_law([p["compute"] for p in pts], [p["value"] for p in pts], key=key, n_boot=n_boot, seed=seed)
            if fits[tid].status == "insufficient" and len(pts) < len(tok_rows):
                fits[tid].message += (f"; on the lower envelope only {len(pts)} of {len(tok_rows)} runs beat all their "
                                      "cheaper runs (--fit-points all fits every run)")
            if not fits[tid].ok:
                warnings.append(f"{name}, {labels[tid]}: {fits[tid].message}")
        series.append({"metric": metric, "part": part, "name": name, "rows": mine, "fits": fits,
                       "optimal": optimal_from_fits(fits), "envelope": lower_envelope(mine, metric),
                       "budgets": best_per_budget(mine, metric)})
    if len({r.get("gfd_name") for r in rows if r.get("gfd_name")}) > 1:
        warnings.append("several gfd_name values: generation FDs of different networks are analysed separately")
    gen = protocol_summary([r.get("gen_protocol") for r in rows])
    for k, vals in gen.items():
        if k.split(".")[-1] in COMPARABILITY and len(vals) > 1:
            warnings.append(f"generation protocol field {k} differs between runs ({len(vals)} values): "
                            "their gFDs are not comparable")
    recon = protocol_summary([next((r.get("recon_protocol") for r in rows if r["tokenizer_id"] == t), None) for t in labels])
    gfd_names = sorted({r["gfd_name"] for r in rows if r.get("gfd_name")})
    return {"labels": labels, "series": series, "warnings": warnings, "gen_protocol": gen, "recon_protocol": recon,
            "pareto": pareto_rfd_gfd(rows), "gfd_name": gfd_names[0] if gfd_names else "gFD",
            "rfd_name": rfd_name(rows, gfd_names[0] if gfd_names else "FD"),
            "options": {"bootstrap_resamples": n_boot, "seed": seed, "fit_points": fit_points}}


# -- output ------------------------------------------------------------------------------------------

def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e5 or x == 0 else f"{x:.3e}"
    return str(x)


def _fit_cells(f: FitResult) -> list[str]:
    if not f.ok:
        return ["", "", "", f.message]
    method, ci = f.primary_ci
    cells = [f"{f.params[p]:.4g} [{ci[p][0]:.4g}, {ci[p][1]:.4g}]" for p in PARAMS]
    return cells + ["; ".join([f"{method} CI", *f.notes])]


def _table(head: list[str], body: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(_num(c) if not isinstance(c, str) else c)}</td>" for c in row)
                + "</tr>" for row in body)
    return f'<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _optimal_lines(s: dict, labels: dict[str, str]) -> list[str]:
    opt = s["optimal"]
    lines = [f"C {seg['c_lo']:.3e} – {seg['c_hi']:.3e}: {labels[seg['key']]}"
             + (" (extrapolated: outside its runs' compute)" if seg["extrapolated"] else "") for seg in opt["segments"]]
    lines += [f"crossover at C = {x['compute']:.3e}: {labels[x['from']]} → {labels[x['to']]} "
              f"({s['name']} {x['value']:.4g})" for x in opt["crossovers"]]
    return lines or ["no fitted law in this series"]


def _plain(value_json: str) -> str:
    """A protocol value for reading: strings without their JSON quotes, anything else as JSON."""
    v = json.loads(value_json)
    return v if isinstance(v, str) else value_json


def _protocol_html(summary: dict[str, dict[str, int]], counted: str) -> str:
    """The fields that decide comparability or sampling in a table; the rest (dates, paths, run
    bookkeeping) folded into a <details> element, which needs no script to open."""
    main, rest = [], []
    for k, vals in summary.items():
        shown = [f"{_plain(v)} (×{n})" if len(vals) > 1 else _plain(v) for v, n in list(vals.items())[:4]]
        more = f" … {len(vals)} distinct values" if len(vals) > 4 else ""
        (main if k.split(".")[-1] in COMPARABILITY + SAMPLING else rest).append([k, "; ".join(shown) + more])
    head = ["field", f"value (×{counted} when they differ)"]
    out = _table(head, main) if main else "<p>not recorded</p>"
    if rest:
        out += f"<details><summary>{len(rest)} other fields</summary>{_table(head, rest)}</details>"
    return out


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#eee}tr:nth-child(even) td{background:#fafafa}.warn{background:#fff3cd;padding:0.5em 1em;border:1px solid #e0c36b}
img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}figure{display:inline-block;margin:0.5em;vertical-align:top}
figure.wide{display:block}
figcaption{font-size:12px;max-width:420px}.grid img{width:300px;image-rendering:pixelated}code{background:#f3f3f3}"""


def render_html(a: dict, study: str, n_rows: int, digest: str, figures: dict[str, Path], grids: list[tuple[bytes, str]],
                rows: list[dict[str, Any]]) -> str:
    L, o = a["labels"], a["options"]
    parts = [f"<h1>Study {html.escape(study)}: compression–generation trade-off</h1>",
             f"<p>{n_rows} generator runs, {len(L)} tokenizers. Input <code>results.parquet</code> sha256 "
             f"<code>{digest}</code>; twostage {html.escape(twostage.__version__)}.</p>"]
    if a["warnings"]:
        parts.append('<div class="warn"><b>Warnings</b><ul>' + "".join(f"<li>{html.escape(w)}</li>" for w in a["warnings"])
                     + "</ul></div>")
    parts += ["<h2>Evaluation protocol</h2><h3>Generation (gen_protocol of the runs)</h3>",
              _protocol_html(a["gen_protocol"], "runs"),
              "<h3>Reconstruction (recon_protocol, one per tokenizer)</h3>",
              _protocol_html(a["recon_protocol"], "tokenizers"),
              "<h2>Compute-optimal tokenizer per budget</h2>"]
    for s in a["series"]:
        parts.append(f"<h3>{html.escape(s['name'])}</h3>")
        if s["metric"] == "val_loss" and len({(r.get("tokens_per_image"), r.get("codebook_size")) for r in s["rows"]}) > 1:
            parts.append("<p><i>Per-token losses of tokenizers with different tokens per image or codebook sizes measure "
                         f"different prediction tasks; {html.escape(a['gfd_name'])} is the comparable measure.</i></p>")
        parts.append("<p>From the fitted laws:</p><ul>"
                     + "".join(f"<li>{html.escape(x)}</li>" for x in _optimal_lines(s, L)) + "</ul>")
        body = []
        for b in s["budgets"]:
            w, at = b["best_within"], b["best_at_level"]
            body.append([b["budget"], L[w["tokenizer_id"]], str(w["generator_size"]), w["generator_label"] or w["run_id"],
                         w["value"], L[at["tokenizer_id"]] if at else "", at["value"] if at else None])
        parts.append("<p>From the runs (best run with compute ≤ budget, and best run at that budget level):</p>"
                     + _table(["budget C", "best tokenizer", "size", "run", "value", "best at level", "value"], body))
    parts.append(f"<h2>Scaling-law fits: L(C) = L_min + exp(λ)·C^α</h2><p>Least squares on log L (C in FLOPs), "
                 f"L_min ∈ [0, min L). Points: {'each tokenizer’s lower envelope of runs' if o['fit_points'] == 'frontier' else 'all runs'}. "
                 "95% intervals: Wald (covariance, Student t) marked “cov CI”; where L_min sits at its bound or "
                 "the covariance is degenerate, the seeded residual bootstrap "
                 f"({o['bootstrap_resamples']} resamples, seed {o['seed']}) marked “bootstrap CI”. "
                 "fits.json holds both for every fit. λ is the intercept at C = 1 FLOP, far outside the data, so it "
                 "moves with α and its interval is wide even where the curve itself is tight.</p>")
    body = [[s["name"], L[t], f"{f.n_points} ({f.n_distinct})", *_fit_cells(f), f.rmse_log]
            for s in a["series"] for t, f in s["fits"].items()]
    parts.append(_table(["series", "tokenizer", "points (distinct C)", "α", "λ", "L_min", "notes", "rmse(log)"], body))
    parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        wide = ' class="wide"' if path.name == "frontier.png" else ""  # one panel per series: give it the page width
        parts.append(f"<figure{wide}>{_img(path.read_bytes(), name)}<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append(f"<h2>Tokenizers: {html.escape(a['rfd_name'])} vs best {html.escape(a['gfd_name'])}</h2>"
                 "<p>Pareto: no other tokenizer is at least as good in both reconstruction and best generation.</p>")
    axes = ["tokenizer_kind", "downsample", "tokens_per_image", "codebook_size", "latent_channels", "crt", "vf",
            "psnr", "ssim", "codebook_usage"]
    body = []
    for p in a["pareto"]:
        first = next(r for r in rows if r["tokenizer_id"] == p["tokenizer_id"])
        runs = sum(r["tokenizer_id"] == p["tokenizer_id"] for r in rows)
        body.append([L[p["tokenizer_id"]], *[first.get(c) for c in axes], runs, p["rfd"], p["best_gfd"],
                     p["best_run_id"] or "", "yes" if p["pareto"] else ""])
    parts.append(_table(["tokenizer", "kind", "f", "tokens/image", "codebook", "latent ch", "CRT", "VF", "PSNR", "SSIM",
                         "codebook usage", "runs", a["rfd_name"], f"best {a['gfd_name']}", "best run", "Pareto"], body))
    if grids:
        parts.append('<h2>Sample grids (best run of each tokenizer)</h2><div class="grid">'
                     + "".join(f"<figure>{_img(d, c)}<figcaption>{html.escape(c)}</figcaption></figure>" for d, c in grids)
                     + "</div>")
    cols = ["run_id", "tokenizer", "generator_label", "generator_size", "params", "train_steps", "compute",
            "val_loss", "gfd", "is_score", "precision", "recall", "rfd", "wall_s_generator"]
    body = [[r["run_id"], L[r["tokenizer_id"]], *[r.get(c) for c in cols[2:]]]
            for r in sorted(rows, key=lambda r: (L[r["tokenizer_id"]], r["compute"] or 0, r["run_id"]))]
    parts.append("<h2>Runs</h2>" + _table(cols[:8] + [a["gfd_name"], "IS", "precision", "recall", a["rfd_name"],
                                                      "generator wall s"], body))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Study {html.escape(study)} report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def render_summary(a: dict, study: str, n_rows: int, digest: str) -> str:
    L = a["labels"]
    gp = a["gen_protocol"]
    proto = ", ".join(f"{k}={'/'.join(map(_plain, gp[k]))}" for k in gp if k.split(".")[-1] in COMPARABILITY + ("sampler", "cfg_scale"))
    out = [f"# Study {study}: compression-generation trade-off", "",
           f"{n_rows} generator runs, {len(L)} tokenizers; results.parquet sha256 `{digest[:16]}`.", "",
           f"Generation protocol: {proto or 'not recorded'}.", ""]
    out += [f"- warning: {w}" for w in a["warnings"]] + ([""] if a["warnings"] else [])
    out += ["## Fits L(C) = L_min + exp(lambda) C^alpha (95% CI: cov = Wald, bootstrap where L_min is at its bound)", "",
            "| series | tokenizer | points | alpha | lambda | L_min | CI |", "|---|---|---|---|---|---|---|"]
    for s in a["series"]:
        for t, f in s["fits"].items():
            cells = _fit_cells(f)
            out.append(f"| {s['name']} | {L[t]} | {f.n_points} | "
                       + (" | ".join(cells[:3]) + f" | {f.primary_ci[0]}" if f.ok else f"{f.message} | | | ") + " |")
    out += ["", "## Compute-optimal tokenizer (fitted laws)", ""]
    for s in a["series"]:
        out += [f"- **{s['name']}**: " + "; ".join(_optimal_lines(s, L))]
    out += ["", f"## {a['rfd_name']} vs best {a['gfd_name']}", "", f"| tokenizer | {a['rfd_name']} | best {a['gfd_name']} | Pareto |",
            "|---|---|---|---|"]
    out += [f"| {L[p['tokenizer_id']]} | {_num(p['rfd'])} | {_num(p['best_gfd'])} | {'yes' if p['pareto'] else ''} |"
            for p in a["pareto"]]
    return "\n".join(out) + "\n"


def _no_nan(x: Any) -> Any:
    """NaN/inf (an interval no bootstrap draw could give) as null: strict JSON readers reject NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def build_report(directory: Path, out: Path | None = None, *, n_boot: int = 1000, seed: int = 0,
                 fit_points: str = "frontier") -> dict[str, Path]:
    directory = Path(directory)
    out = Path(out) if out is not None else directory / "report"
    rows = load_rows(directory)
    if not rows:
        raise ValueError(f"{directory / 'results.parquet'} has no rows")
    digest = hashlib.sha256((directory / "results.parquet").read_bytes()).hexdigest()
    log.info("%d runs, %d tokenizers; fitting (%d bootstrap resamples per fit)", len(rows),
             len({r["tokenizer_id"] for r in rows}), n_boot)
    a = analyze(rows, n_boot=n_boot, seed=seed, fit_points=fit_points)
    L = a["labels"]
    colors = plots.tokenizer_colors(list(L))
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    for s in a["series"]:
        stem = f"{s['metric']}_{''.join(ch if ch.isalnum() else '_' for ch in s['part'])}_vs_compute"
        figures[f"{s['name']} vs compute"] = plots.metric_vs_compute(
            out / f"{stem}.png", s["rows"], s["fits"], s["metric"], s["name"], f"{s['name']} vs training compute", L, colors)
    panels = [{"title": f"optimal tokenizer: {s['name']}", "ylabel": s["name"], "fits": s["fits"],
               "optimal": s["optimal"], "envelope": s["envelope"]} for s in a["series"]]
    if panels:
        figures["compute-optimal frontier"] = plots.frontier_plot(out / "frontier.png", panels, L, colors)
    extra = {"validation loss per position": plots.per_position(out / "per_position.png", rows, L, colors),
             f"{a['rfd_name']} vs {a['gfd_name']}": plots.rfd_vs_gfd(out / "rfd_vs_gfd.png", a["pareto"], a["rfd_name"],
                                                                   a["gfd_name"], L, colors)}
    figures.update({k: v for k, v in extra.items() if v is not None})
    grids = []
    for p in sorted((p for p in a["pareto"] if p["best_run_id"]), key=lambda p: p["best_gfd"])[:MAX_GRIDS]:
        r = next(r for r in rows if r["run_id"] == p["best_run_id"])
        data = plots.grid_thumbnail(directory / r["grid_png"]) if r.get("grid_png") else None
        if data is None:
            a["warnings"].append(f"sample grid of run {r['run_id']} is missing ({r.get('grid_png')})")
            continue
        grids.append((data, f"{L[r['tokenizer_id']]} — {r.get('generator_label') or r['run_id']}: "
                            f"{r.get('gfd_name') or 'gFD'} {r['gfd']:.4g}"))
    study = str(rows[0].get("study") or directory.name)
    fits_doc = {"metadata": {"study": study, "results_sha256": digest, "twostage_version": twostage.__version__,
                             "law": "L(C) = L_min + exp(lambda) * C^alpha, C in FLOPs", **a["options"]},
                "fits": [f.to_dict() for s in a["series"] for f in s["fits"].values()],
                "optimal": [{"series": s["name"], "segments": s["optimal"]["segments"],
                             "crossovers": s["optimal"]["crossovers"], "envelope": s["envelope"],
                             "budgets": s["budgets"]} for s in a["series"]],
                "rfd_vs_gfd": a["pareto"], "warnings": a["warnings"]}
    paths = {"fits": out / "fits.json", "html": out / "report.html", "summary": out / "summary.md"}
    paths["fits"].write_text(json.dumps(_no_nan(fits_doc), indent=1, sort_keys=True, allow_nan=False) + "\n")
    paths["html"].write_text(render_html(a, study, len(rows), digest, figures, grids, rows), encoding="utf-8")
    paths["summary"].write_text(render_summary(a, study, len(rows), digest), encoding="utf-8")
    return {**paths, **{f"figure:{k}": v for k, v in figures.items()}}


def register_report(sub: argparse._SubParsersAction) -> None:
    """Add `report` to the `twostage study` action group (called by twostage/study/commands.py)."""
    p = sub.add_parser("report", help="fits, compute-optimal frontiers and figures from DIR/results.parquet",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="study folder holding results.parquet")
    p.add_argument("--out", type=Path, default=None, help="report folder (default DIR/report)")
    p.add_argument("--bootstrap", type=_count, default=1000,
                   help="bootstrap resamples per fit for the confidence intervals (0: covariance intervals only)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--fit-points", choices=("frontier", "all"), default="frontier",
                   help="fit each tokenizer's lower envelope of runs (compute-optimal law) or every run")
    p.set_defaults(func=cmd_report)


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def cmd_report(args: argparse.Namespace) -> int:
    try:
        paths = build_report(args.dir, args.out, n_boot=args.bootstrap, seed=args.seed, fit_points=args.fit_points)
    except (FileNotFoundError, ValueError) as err:
        print(f"study report: {err}", file=sys.stderr)
        return 2
    print(paths["html"])
    return 0
