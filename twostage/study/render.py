"""The study report as text: the findings (one line per question, with its evidence), report.html and
summary.md, from twostage.study.report.analyze's result.

report.html, in order: what the study found; warnings; figures (error bars: 95% intervals over seeds);
each tokenizer's training curves with its convergence verdict; sample grids (a row per class); cells
(mean over seeds next to the evaluation's own noise); every pairwise comparison; compute-optimal
tokenizer and law fits (intervals over residuals and over seeds); tokenizers (rFD vs gFD); the runs;
the evaluation protocols last.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import twostage
from twostage.study.curves import PLATEAU
from twostage.study.fit import PARAMS, FitResult
from twostage.study.frontier import finite
from twostage.study.protocols import COMPARABILITY, SAMPLING, plain
from twostage.study.reconstruction import reconstruction_lines
from twostage.study.replicates import ci_text
from twostage.study.verdicts import MATCHED_COMPUTE_RATIO, budget_line, matched_line

__all__ = ["findings", "render_html", "render_summary", "SECTIONS"]

# The sections of report.html, in order (their element ids).
SECTIONS = ("found", "figures", "curves", "grids", "cells", "comparisons", "fits", "tokenizers", "runs", "protocol")


def _e(x: float) -> str:
    return f"{x:.2e}" if finite(x) else "?"


def _crossover_line(s: dict, x: dict, L: dict[str, str]) -> str:
    head = f"{s['name']}: the fitted optimum changes from {L[x['from']]} to {L[x['to']]}"
    meas = f"measured range of both {_e(x['measured'][0])}–{_e(x['measured'][1])}"
    if x["low"] is None:
        return f"{head} at C ≈ {_e(x['compute'])}: {x['status']}; where one seed's laws cross is not a finding."
    n = max(s["n_units"].get(x["from"], 0), s["n_units"].get(x["to"], 0))
    units = f"bootstrap over {n} {s['level']}s" + ("; with fewer than 10 seeds percentile intervals run narrow"
                                                   if n < 10 else "")
    ci = f"[{_e(x['low'])}, {_e(x['high'])}]"
    if x["resolved"]:
        return f"{head} at C = {_e(x['compute'])} {ci} ({units}; {meas})."
    return f"{head} at C ≈ {_e(x['compute'])}, {x['status']}: {ci} ({units}; {meas})."


def _variance_line(s: dict) -> str:
    comp, cells = s["components"], s["cells"]
    if comp is None or comp["dominant"] is None:
        return f"{s['name']}: one seed per cell, so the sources of variation cannot be separated."
    src = comp["sources"][comp["dominant"]]
    others = ", ".join(f"{k} {100 * v['fraction']:.0f}%" for k, v in comp["sources"].items() if k != comp["dominant"])
    seed_sd = [c.interval.std for c in cells if finite(c.interval.std)]
    own = [c.internal_sd for c in cells if c.internal_sd is not None]
    sds = ""
    if seed_sd:
        sds = f"; median sd over seeds {sorted(seed_sd)[len(seed_sd) // 2]:.3g}"
        if own:
            sds += f" vs the evaluation's own sd {sorted(own)[len(own) // 2]:.3g} (its bootstrap / stderr)"
    return (f"{s['name']}: {comp['dominant']} seeds move it most ({100 * src['fraction']:.0f}% of the variance"
            f"{'; ' + others if others else ''}), pooled over {comp['cells']} cells{sds}. Caveat: each cell's "
            f"estimate rests on as few as {src['min_df']} degrees of freedom ({src['df']} in all): a point estimate, "
            "not a test.")


def _budget_lines(s: dict) -> list[str]:
    """One line per budget (the best tokenizer there against each other one); pairs not compared for
    one reason at several budgets share a line."""
    lines, skipped, groups = [], {}, {}
    for c in s["headline"]:
        if c.compared:
            groups.setdefault(c.group, []).append(c)
        else:
            skipped.setdefault((c.label_a, c.label_b, c.pairing) if c.label_a < c.label_b else
                               (c.label_b, c.label_a, c.pairing), []).append(f"{c.group[2]} ({c.group[0]} {c.group[1]})")
    lines += [budget_line(cs, s["name"]) for cs in groups.values()]
    for (a, b, why), where in skipped.items():
        lines.append(f"{a} vs {b} on {s['name']}, {len(where)} budget{'s' if len(where) > 1 else ''} "
                     f"({', '.join(where)}): {why}.")
    return lines or ["one tokenizer per budget: nothing to compare"]


def findings(a: dict) -> list[tuple[str, list[str]]]:
    """[(section title, [lines])]: the design, per series the best tokenizer vs each other at every
    budget, the crossovers of the fitted optimum, and where the variation comes from."""
    d, L = a["design"], a["labels"]
    seeds = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in d["seeds"].items())
    n_cmp = sum(c.compared for s in a["series"] for c in s["comparisons"])
    top = [f"{d['rows']} rows: {d['tokenizer_cells']} tokenizer cells, {d['generator_cells']} generator cells, "
           f"{d['generator_runs']} generator runs; seeds: {seeds}.",
           "A winner is named only when the 95% interval of the (paired) difference excludes 0; "
           f"{n_cmp} comparisons at 95% each, so about 1 in 20 true ties would still read as a winner."]
    if d.get("seed_design") == "paired":
        top.append("Seeds paired: the i-th generator seed trained only on the i-th tokenizer seed, so each interval "
                   "covers both sources of variance together and the report does not split them.")
    if len(d["seeds"]["tokenizer"]) == 1 and len(d["seeds"]["generator"]) > 1:
        top.append("1 tokenizer seed: the verdicts hold for these tokenizer runs; how much another tokenizer "
                   "training run would move them is not sampled.")
    if all(c.interval.n < 2 for s in a["series"] for c in s["cells"]):
        top.append("1 seed: no interval. Every cell has a single training seed, so no line below names a winner; "
                   "list more seeds in the study spec (seeds.generator, seeds.tokenizer) to get intervals.")
    out = [("Design", top)]
    if a.get("stage1"):
        out.append(("Tokenizers: reconstruction over tokenizer seeds",
                    reconstruction_lines(a["stage1"], L, a.get("rfd_name") or "rFD")))
    for generation in (True, False):  # generation metrics first: they compare across prediction tasks
        for s in a["series"]:
            if (s["metric"] != "val_loss") == generation:
                out.append((f"{s['name']} at each budget", _budget_lines(s)))
                if s.get("matched"):  # other sizes / budgets of near-equal compute (tokens per image differ)
                    out.append((f"{s['name']} at matched compute (within {MATCHED_COMPUTE_RATIO}x, other sizes or "
                                "budgets)", [matched_line(c, s["name"]) for c in s["matched"]]))
    if a.get("context"):
        out.append((f"{a['context']['name']} at each budget", _budget_lines(a["context"])))
    laws = []
    for s in a["series"]:
        task = {c.tokenizer_cell: c.task for c in s["cells"]}
        one_task = lambda tcs: s["metric"] != "val_loss" or len({task[t] for t in tcs}) == 1
        for x in s["crossovers"]:
            laws.append(_crossover_line(s, x, L) if one_task((x["from"], x["to"])) else
                        f"{s['name']}: the laws of {L[x['from']]} and {L[x['to']]} cross at C ≈ {_e(x['compute'])}, "
                        "but their per-token losses measure different prediction tasks: not compared.")
        ok = [tc for tc, f in s["fits"].items() if f.ok]
        if len(ok) > 1 and not s["crossovers"] and s["optimal"]["segments"] and one_task(ok):
            laws.append(f"{s['name']}: no crossover; the lowest fitted law over the whole range is "
                        f"{L[s['optimal']['segments'][0]['key']]}"
                        + (" (1 seed: no interval)." if s["level"] is None else "."))
    out.append(("Compute-optimal tokenizer (laws fitted to cell means)", laws or ["no two fitted laws in any series"]))
    out.append(("Where the variation comes from", [_variance_line(s) for s in a["series"]]))
    return out


# -- html ----------------------------------------------------------------------------------------------

def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return ""
        return f"{x:.{digits}g}" if abs(x) < 1e5 or x == 0 else f"{x:.3e}"
    return str(x)


def _table(head: list[str], body: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(_num(c) if not isinstance(c, str) else c)}</td>" for c in row)
                + "</tr>" for row in body)
    return f'<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fit_cells(f: FitResult, s: dict, tc: str) -> list[str]:
    seed_ci = s["seed_ci"].get(tc)
    if not f.ok:
        return ["", "", "", "", f.message]
    method, ci = f.primary_ci
    cells = [f"{f.params[p]:.4g} [{ci[p][0]:.4g}, {ci[p][1]:.4g}]" for p in PARAMS]
    if seed_ci and all(finite(v) for v in seed_ci["alpha"]):
        seeds = (f"α [{seed_ci['alpha'][0]:.4g}, {seed_ci['alpha'][1]:.4g}], L_min [{seed_ci['l_min'][0]:.4g}, "
                 f"{seed_ci['l_min'][1]:.4g}] ({seed_ci['units']} seeds)")
    elif s["n_units"].get(tc, 0) > 1:
        seeds = "not resampled (--bootstrap 0)" if not s.get("resample") else "no interval (refits failed)"
    else:
        seeds = "1 seed: no interval"
    return cells + [seeds, "; ".join([f"{method} CI", *f.notes])]


def _optimal_lines(s: dict, L: dict[str, str]) -> list[str]:
    opt = s["optimal"]
    lines = [f"C {seg['c_lo']:.3e} – {seg['c_hi']:.3e}: {L[seg['key']]}"
             + (" (extrapolated: outside its runs' compute)" if seg["extrapolated"] else "") for seg in opt["segments"]]
    for x in s["crossovers"]:
        ci = f", seed interval [{_e(x['low'])}, {_e(x['high'])}]: {x['status']}" if x["low"] is not None else \
            f": {x['status']}"
        lines.append(f"crossover at C = {x['compute']:.3e}: {L[x['from']]} → {L[x['to']]} "
                     f"({s['name']} {x['value']:.4g}{ci})")
    unfitted = [L[k] for k in opt.get("unfitted", [])]
    if lines and unfitted:
        lines.append(f"among the fitted laws only: {', '.join(unfitted)} not compared (no fitted law)")
    elif not lines and len(opt.get("fitted", [])) == 1:
        lines = [f"only {L[opt['fitted'][0]]} has a fitted law: no comparison"]
    return lines or ["no fitted law in this series"]


def _protocol_html(summary: dict[str, dict[str, int]], counted: str) -> str:
    """The fields that decide comparability or sampling in a table; the rest (dates, paths, run
    bookkeeping) folded into a <details> element, which needs no script to open."""
    main, rest = [], []
    for k, vals in summary.items():
        shown = [f"{plain(v)} (×{n})" if len(vals) > 1 else plain(v) for v, n in list(vals.items())[:4]]
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
#found{background:#eef5fb;border:1px solid #9cc3e4;padding:0.3em 1.2em 0.8em}#found li{margin:0.25em 0}
img{max-width:100%;border:1px solid #ddd;margin:0.3em 0}figure{display:inline-block;margin:0.5em;vertical-align:top}
figure.wide{display:block}
figcaption{font-size:12px;max-width:420px}.grid img{width:360px;image-rendering:pixelated}code{background:#f3f3f3}"""


def _cells_html(a: dict) -> list[str]:
    L = a["labels"]
    parts = ['<section id="cells"><h2>Cells: mean over seeds, and the evaluation’s own noise</h2>'
             "<p>Mean [95% CI] over the top varying seed level (tokenizer seeds, else generator seeds; "
             "Student t, twostage/study/stats.py mean_interval). Apart from it: the sd over evaluation seeds "
             "within one generator run (pooled), and the evaluation’s own sd from its bootstrap interval or "
             "standard error, so one sees whether training seeds or the measurement dominate (FDinf's stderr is its "
             "extrapolation's only, not the sampling error of the sample set).</p>"]
    for s in a["series"]:
        body = []
        for c in s["cells"]:
            vc = c.components
            body.append([L[c.tokenizer_cell], f"{c.generator_kind} {c.generator_size}", c.train_steps, c.compute,
                         ci_text(c.interval), f"{c.interval.n} {c.level}{'s' if c.interval.n > 1 else ''}",
                         c.interval.std, f"{c.eval_sd:.4g} ({c.eval_df} df)" if c.eval_sd is not None else "",
                         c.internal_sd, (vc.dominant or "") if vc else ""])
        parts.append(f"<h3>{html.escape(s['name'])}</h3>" + _table(
            ["tokenizer", "generator", "steps", "C", "mean [95% CI]", "n", "sd over seeds", "sd over eval seeds",
             "evaluation's own sd", "largest variance (cell)"], body))
    return parts + ["</section>"]


def _curves_html(a: dict, figures: dict[str, Path]) -> list[str]:
    """The tokenizers' training curves: a verdict table, then one figure per tokenizer."""
    curves = a["curves"]
    rfd = next((c.rfd_name for c in curves if c.rfd_name), "rFD")
    parts = ['<section id="curves"><h2>Tokenizer training curves</h2>'
             "<p>Each tokenizer run validates at every checkpoint on the first <code>monitor.val_images</code> images "
             "of the val split (<code>RUN/val/step_*.json</code>): rFD, PSNR and codebook usage against the training "
             "step, one line per tokenizer seed; the usage line is the training log's window statistic. A tokenizer "
             f"has <b>plateaued</b> when, for every seed, the rFD of its last two checkpoints differs by less than "
             f"{100 * PLATEAU:.0f}% of the last value (the percentages below are of the last value). The rFD of a few "
             f"images is biased upward: compare along a curve, not with the {html.escape(a['rfd_name'])} column of "
             "the tables (the evaluation's full split).</p>"]

    def last(c, key: str, digits: int) -> str:
        return "; ".join(f"seed {s.seed}: {_num(s.val[key][-1][1], digits)}" for s in c.seeds if s.val.get(key))

    body = [[c.label, len(c.seeds), sum(bool(s.val.get("rfd")) for s in c.seeds),
             max((s.val["rfd"][-1][0] for s in c.seeds if s.val.get("rfd")), default=None),
             last(c, "rfd", 4), last(c, "psnr", 4), last(c, "codebook_usage", 3), c.verdict] for c in curves]
    parts.append(_table(["tokenizer", "seeds", "seeds with a curve", "last step", f"last {rfd}", "last PSNR",
                         "last usage (val)", "verdict"], body))
    for c in curves:
        if c.cell in figures:
            caption = f"{c.label}: {c.verdict}"
            parts.append(f'<figure class="wide">{_img(figures[c.cell].read_bytes(), caption)}'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return parts + ["</section>"]


def render_html(a: dict, study: str, digest: str, figures: dict[str, Path], grids: list[tuple[bytes, str]],
                curve_figures: dict[str, Path]) -> str:
    """report.html; `curve_figures`: tokenizer cell -> its training-curves figure (a["curves"] the verdicts)."""
    L, o, rows = a["labels"], a["options"], a["rows"]
    parts = [f"<h1>Study {html.escape(study)}: compression–generation trade-off</h1>",
             f"<p>{len(rows)} rows ({a['design']['generator_runs']} generator runs), {len(L)} tokenizers. Input "
             f"<code>results.parquet</code> sha256 <code>{digest}</code>; twostage {html.escape(twostage.__version__)}.</p>",
             '<section id="found"><h2>What the study found</h2>']
    for title, lines in a["findings"]:
        parts.append(f"<h3>{html.escape(title)}</h3><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
    parts.append("</section>")
    if a["warnings"]:
        parts.append('<div class="warn"><b>Warnings</b><ul>' + "".join(f"<li>{html.escape(w)}</li>" for w in a["warnings"])
                     + "</ul></div>")
    parts.append('<section id="figures"><h2>Figures</h2><p>Error bars: 95% intervals over seeds (none where a '
                 "cell has one seed); small dots: single generator runs.</p>")
    for name, path in figures.items():
        wide = ' class="wide"' if path.name == "frontier.png" else ""  # one panel per series: give it the page width
        parts.append(f"<figure{wide}>{_img(path.read_bytes(), name)}<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</section>")
    parts += _curves_html(a, curve_figures)
    if grids:
        parts.append('<section id="grids"><h2>Sample grids (best cell of each tokenizer, one seed)</h2><div class="grid">'
                     + "".join(f"<figure>{_img(d, c)}<figcaption>{html.escape(c)}</figcaption></figure>" for d, c in grids)
                     + "</div></section>")
    parts += _cells_html(a)
    parts.append('<section id="comparisons"><h2>All pairwise comparisons</h2><p>Difference = first − second '
                 "tokenizer (the first has the better mean), 95% interval: paired t over shared seeds, Welch t "
                 "when no seeds are shared.</p>")
    for s in a["series"]:
        body = [[f"{c.group[0]} {c.group[1]} {c.group[2]} steps", c.label_a, c.label_b, c.a.mean, c.b.mean,
                 (f"{c.diff.mean:.4g} [{c.diff.low:.4g}, {c.diff.high:.4g}]" if c.diff.resolved else
                  f"{c.diff.mean:.4g} (no interval)") if c.diff else "", c.pairing, c.verdict] for c in s["comparisons"]]
        if body:
            parts.append(f"<h3>{html.escape(s['name'])}</h3>" + _table(
                ["budget", "A", "B", "mean A", "mean B", "A − B [95% CI]", "seeds", "verdict"], body))
    parts.append("</section>")
    parts.append('<section id="fits"><h2>Compute-optimal tokenizer per budget</h2>')
    for s in a["series"]:
        parts.append(f"<h3>{html.escape(s['name'])}</h3>")
        if s["metric"] == "val_loss" and len({c.task for c in s["cells"]}) > 1:
            parts.append("<p><i>Per-token losses of tokenizers with different tokens per image or codebook sizes measure "
                         f"different prediction tasks; {html.escape(a['gfd_name'])} is the comparable measure.</i></p>")
        parts.append("<p>From the fitted laws:</p><ul>"
                     + "".join(f"<li>{html.escape(x)}</li>" for x in _optimal_lines(s, L)) + "</ul>")
        body = [[b["budget"], L[b["best_within"]["tokenizer_id"]], str(b["best_within"]["generator_size"]),
                 b["best_within"]["value"], L[b["best_at_level"]["tokenizer_id"]] if b["best_at_level"] else "",
                 b["best_at_level"]["value"] if b["best_at_level"] else None] for b in s["budgets"] if b["best_within"]]
        parts.append("<p>From the cell means (best cell with compute ≤ budget, and at that budget level; whether "
                     "it is distinguishable from the next is in the comparisons above):</p>"
                     + _table(["budget C", "best tokenizer", "size", "mean", "best at level", "mean"], body))
    parts.append(f"<h2>Scaling-law fits: L(C) = L_min + exp(λ)·C^α</h2><p>Least squares on log L of the cell means "
                 f"(C in FLOPs), L_min ∈ [0, min L). Points: {'each tokenizer’s lower envelope of cells' if o['fit_points'] == 'frontier' else 'all cells'}. "
                 "95% intervals: Wald (covariance, Student t) marked “cov CI”; where L_min sits at its bound or "
                 "the covariance is degenerate, the seeded residual bootstrap "
                 f"({o['bootstrap_resamples']} resamples, seed {o['seed']}) marked “bootstrap CI”. Both say how tightly "
                 "the points pin one curve. “Over seeds”: percentile intervals of the law refitted to cell means of "
                 "seeds drawn with replacement (whole sweeps); too narrow with fewer than about ten seeds. λ is the "
                 "intercept at C = 1 FLOP, far outside the data, so it moves with α.</p>")
    body = [[s["name"], L[t], f"{f.n_points} ({f.n_distinct})", *_fit_cells(f, s, t), f.rmse_log]
            for s in a["series"] for t, f in s["fits"].items()]
    parts.append(_table(["series", "tokenizer", "points (distinct C)", "α", "λ", "L_min", "over seeds", "notes",
                         "rmse(log)"], body) + "</section>")
    parts.append(f'<section id="tokenizers"><h2>Tokenizers: {html.escape(a["rfd_name"])} vs best {html.escape(a["gfd_name"])}</h2>'
                 "<p>Pareto: no other tokenizer is at least as good in both reconstruction and best generation "
                 "(point values; the intervals over seeds are in the figure).</p>")
    axes = ["tokenizer_kind", "downsample", "tokens_per_image", "codebook_size", "latent_channels", "crt", "vf",
            "psnr", "ssim", "codebook_usage"]
    body = []
    for p in a["pareto"]:
        first = next(r for r in rows if r["tokenizer_cell"] == p["tokenizer_id"])
        runs = len({r["run_id"] for r in rows if r["tokenizer_cell"] == p["tokenizer_id"]})
        gfd = "" if p["best_gfd"] is None else (f"{p['best_gfd']:.4g} [{p['gfd_low']:.4g}, {p['gfd_high']:.4g}]"
                                               if finite(p["gfd_low"]) else f"{p['best_gfd']:.4g} (1 seed)")
        body.append([L[p["tokenizer_id"]], *[first.get(c) for c in axes], runs, p["tokenizer_seeds"], p["rfd"], gfd,
                     "yes" if p["pareto"] else ""])
    parts.append(_table(["tokenizer", "kind", "f", "tokens/image", "codebook", "latent ch", "CRT", "VF", "PSNR", "SSIM",
                         "codebook usage", "generator runs", "tokenizer seeds", a["rfd_name"], f"best {a['gfd_name']}",
                         "Pareto"], body) + "</section>")
    cols = ["run_id", "tokenizer", "seeds (tok/gen/eval)", "generator_label", "params", "compute", "val_loss", "gfd",
            "is_score", "precision", "recall", "rfd", "wall_s_generator"]
    body = [[r["run_id"], L[r["tokenizer_cell"]], f"{r['tokenizer_seed']}/{r['generator_seed']}/{r['eval_seed']}",
             *[r.get(c) for c in cols[3:]]]
            for r in sorted(rows, key=lambda r: (L[r["tokenizer_cell"]], r["compute"] or 0, r["run_id"], r["eval_seed"]))]
    parts.append('<section id="runs"><h2>Runs</h2>' + _table(
        cols[:7] + [a["gfd_name"], "IS", "precision", "recall", a["rfd_name"], "generator wall s"], body) + "</section>")
    parts += ['<section id="protocol"><h2>Evaluation protocol</h2><h3>Generation (gen_protocol of the evaluations)</h3>',
              _protocol_html(a["gen_protocol"], "evaluations"),
              "<h3>Reconstruction (recon_protocol, one per tokenizer run)</h3>",
              _protocol_html(a["recon_protocol"], "tokenizer runs"), "</section>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Study {html.escape(study)} report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def render_summary(a: dict, study: str, digest: str) -> str:
    L = a["labels"]
    gp = a["gen_protocol"]
    proto = ", ".join(f"{k}={'/'.join(map(plain, gp[k]))}" for k in gp if k.split(".")[-1] in COMPARABILITY + ("sampler", "cfg_scale"))
    out = [f"# Study {study}: compression-generation trade-off", "",
           f"{len(a['rows'])} rows, {len(L)} tokenizers; results.parquet sha256 `{digest[:16]}`.", "",
           f"Generation protocol: {proto or 'not recorded'}.", "", "## What the study found", ""]
    for title, lines in a["findings"]:
        out += [f"**{title}**", ""] + [f"- {x}" for x in lines] + [""]
    out += [f"- warning: {w}" for w in a["warnings"]] + ([""] if a["warnings"] else [])
    out += ["## Fits L(C) = L_min + exp(lambda) C^alpha on cell means (95% CI: cov = Wald, bootstrap where L_min is "
            "at its bound; over seeds: bootstrap of whole seeds)", "",
            "| series | tokenizer | points | alpha | lambda | L_min | over seeds | CI |", "|---|---|---|---|---|---|---|---|"]
    for s in a["series"]:
        for t, f in s["fits"].items():
            cells = _fit_cells(f, s, t)
            out.append(f"| {s['name']} | {L[t]} | {f.n_points} | "
                       + (" | ".join(cells[:4]) + f" | {f.primary_ci[0]}" if f.ok else f"{f.message} | | | | ") + " |")
    out += ["", "## Compute-optimal tokenizer (fitted laws)", ""]
    for s in a["series"]:
        out += [f"- **{s['name']}**: " + "; ".join(_optimal_lines(s, L))]
    out += ["", "## Cell means over seeds (95% CI: Student t over the top varying seed level)", "",
            "| series | tokenizer | generator | steps | C | mean [95% CI] | n | sd over seeds |", "|---|---|---|---|---|---|---|---|"]
    for s in a["series"] + ([a["context"]] if a.get("context") else []):
        out += [f"| {s['name']} | {L[c.tokenizer_cell]} | {c.generator_kind} {c.generator_size} | {c.train_steps} | "
                f"{_e(c.compute)} | {ci_text(c.interval)} | {c.interval.n} | {_num(c.interval.std)} |" for c in s["cells"]]
    out += ["", f"## Tokenizer training curves (plateaued: last two checkpoints' rFD within {100 * PLATEAU:.0f}% of "
            "the last value, every seed)", ""]
    out += [f"- {c.label}: {c.verdict}" for c in a["curves"]]
    out += ["", f"## {a['rfd_name']} vs best {a['gfd_name']}", "", f"| tokenizer | {a['rfd_name']} | best {a['gfd_name']} | Pareto |",
            "|---|---|---|---|"]
    out += [f"| {L[p['tokenizer_id']]} | {_num(p['rfd'])} | {_num(p['best_gfd'])} | {'yes' if p['pareto'] else ''} |"
            for p in a["pareto"]]
    return "\n".join(out) + "\n"
