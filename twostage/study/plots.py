"""The report's figures, as PNG files (matplotlib's Agg renderer through `Figure` directly: no pyplot,
so no global backend state and nothing tries to open a window).

Every function takes plain data (rows, fits, frontier dicts, display labels and colours keyed by
tokenizer_id) and writes one PNG. Metric names come from the caller, who takes them from the table
(gfd_name), so a figure never calls an FD-EffNetLite0 an "FID". The PNGs carry no software-version
metadata, so the same table gives byte-identical files with the same fonts.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from twostage.study.fit import FitResult
from twostage.study.frontier import finite

__all__ = ["tokenizer_colors", "metric_vs_compute", "frontier_plot", "per_position", "rfd_vs_gfd",
           "grid_thumbnail"]

DPI = 100
_MARKERS = "osD^vP*Xh"


def tokenizer_colors(ids: Sequence[str]) -> dict[str, Any]:
    """A fixed colour per tokenizer in sorted-id order (tab10, then tab20 for larger studies)."""
    import matplotlib

    ids = sorted(ids)
    cmap = matplotlib.colormaps["tab10" if len(ids) <= 10 else "tab20"]
    return {tid: cmap(i % cmap.N) for i, tid in enumerate(ids)}


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    return path


def _fmt_param(f: FitResult) -> str:
    return f"α={f.params['alpha']:.3f}, L_min={f.params['l_min']:.3g}"


def metric_vs_compute(path: Path, rows: Sequence[Mapping], fits: Mapping[str, FitResult], metric: str,
                      ylabel: str, title: str, labels: Mapping[str, str], colors: Mapping[str, Any]) -> Path:
    """Log-log scatter of one metric against compute, one colour per tokenizer and one marker per
    generator size; each fitted law drawn solid over its own points' range."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    sizes = sorted({str(r.get("generator_size")) for r in rows})
    marker = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(sizes)}
    for tid in sorted({r["tokenizer_id"] for r in rows}):
        mine = [r for r in rows if r["tokenizer_id"] == tid]
        for s in sizes:
            pts = [(r["compute"], r[metric]) for r in mine if str(r.get("generator_size")) == s]
            if pts:
                c, v = zip(*sorted(pts))
                ax.scatter(c, v, color=colors[tid], marker=marker[s], s=28, alpha=0.8, edgecolors="none")
        f = fits.get(tid)
        name = labels[tid]
        if f is not None and f.ok:
            lo, hi = f.compute_range
            grid = np.geomspace(lo, hi, 100)
            ax.plot(grid, f.predict(grid), color=colors[tid], lw=1.8, label=f"{name} ({_fmt_param(f)})")
        else:
            ax.plot([], [], color=colors[tid], lw=1.8, label=f"{name} (no fit)")
    for s in sizes:
        ax.scatter([], [], color="gray", marker=marker[s], label=f"generator {s}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def frontier_plot(path: Path, panels: Sequence[dict], labels: Mapping[str, str],
                  colors: Mapping[str, Any]) -> Path:
    """One panel per analysed series: every fitted law thin, their minimum thick in the colour of
    the optimal tokenizer, crossovers as dotted verticals, and the empirical lower envelope of runs
    as black-edged markers. panel: {title, ylabel, fits, optimal, envelope}."""
    fig = Figure(figsize=(6.5 * max(1, len(panels)), 4.8))
    for i, p in enumerate(panels):
        ax = fig.add_subplot(1, max(1, len(panels)), i + 1)
        opt = p["optimal"]
        for tid, f in sorted(p["fits"].items()):
            if f.ok and opt["grid"]:
                ax.plot(opt["grid"], f.predict(np.array(opt["grid"])), color=colors[tid], lw=0.8, alpha=0.5)
        for seg in opt["segments"]:
            g = np.geomspace(seg["c_lo"], seg["c_hi"], 60)
            ax.plot(g, p["fits"][seg["key"]].predict(g), color=colors[seg["key"]], lw=3.5,
                    ls="--" if seg["extrapolated"] else "-", label=f"optimal: {labels[seg['key']]}"
                    + (" (extrapolated: dashed)" if seg["extrapolated"] else ""))
        for x in opt["crossovers"]:
            ax.axvline(x["compute"], color="k", ls=":", lw=1)
            ax.text(x["compute"], 0.02, f" {x['compute']:.2e}", transform=ax.get_xaxis_transform(), fontsize=7,
                    rotation=90, va="bottom", ha="right")
        for e in p["envelope"]:
            ax.scatter([e["compute"]], [e["value"]], color=colors[e["tokenizer_id"]], edgecolors="k",
                       marker="*", s=90, zorder=5)
        ax.scatter([], [], color="w", edgecolors="k", marker="*", s=90, label="best run so far (envelope)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(p["ylabel"])
        ax.set_title(p["title"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))  # one legend entry per tokenizer even if it wins twice
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    return _save(fig, path)


def per_position(path: Path, rows: Sequence[Mapping], labels: Mapping[str, str],
                 colors: Mapping[str, Any]) -> Path | None:
    """Validation loss per token position of each tokenizer's largest-compute AR run (None when no
    row has per-position losses)."""
    best: dict[str, Mapping] = {}
    for r in rows:
        pos = r.get("val_loss_per_position")
        if pos is None or len(pos) == 0 or not finite(r.get("compute")):
            continue
        cur = best.get(r["tokenizer_id"])
        if cur is None or (r["compute"], r["run_id"]) > (cur["compute"], cur["run_id"]):
            best[r["tokenizer_id"]] = r
    if not best:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for tid, r in sorted(best.items()):
        v = np.asarray(r["val_loss_per_position"], dtype=np.float64)
        ax.plot(np.arange(1, len(v) + 1), v, color=colors[tid], lw=1.5,
                label=f"{labels[tid]} — {r.get('generator_label') or r['run_id']} (C={r['compute']:.2e})")
    ax.set_xscale("log")
    ax.set_xlabel("token position (1 = first token, raster order)")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("AR validation loss per position, largest-compute run of each tokenizer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def rfd_vs_gfd(path: Path, points: Sequence[Mapping], rfd_name: str, gfd_name: str,
               labels: Mapping[str, str], colors: Mapping[str, Any]) -> Path | None:
    """Tokenizers' reconstruction FD against the best generation FD of their runs, the Pareto set
    joined by a line, and gFD = rFD (the floor a generator cannot beat by much) dashed."""
    pts = [p for p in points if p["rfd"] is not None and p["best_gfd"] is not None]
    if not pts:
        return None
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    for p in pts:
        tid = p["tokenizer_id"]
        ax.scatter([p["rfd"]], [p["best_gfd"]], color=colors[tid], s=60 if p["pareto"] else 30,
                   edgecolors="k" if p["pareto"] else "none", zorder=3)
        ax.annotate(labels[tid], (p["rfd"], p["best_gfd"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = sorted((p["rfd"], p["best_gfd"]) for p in pts if p["pareto"])
    if front:
        ax.plot(*zip(*front), color="k", lw=1.2, label="Pareto set")
    lo = min(min(p["rfd"], p["best_gfd"]) for p in pts)
    hi = max(max(p["rfd"], p["best_gfd"]) for p in pts)
    ax.plot([lo, hi], [lo, hi], color="gray", ls="--", lw=1, label=f"{gfd_name} = {rfd_name}")
    ax.set_xlabel(f"{rfd_name} (reconstruction)")
    ax.set_ylabel(f"best {gfd_name} over the tokenizer's runs")
    ax.set_title("Reconstruction vs generation quality per tokenizer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grid_thumbnail(path: Path, max_side: int = 1024) -> bytes | None:
    """A sample grid PNG's bytes, downscaled (and re-encoded) when a side exceeds max_side so that
    a report of many large grids stays small. None when the file is missing or unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            if max(im.size) <= max_side and im.format == "PNG":
                return Path(path).read_bytes()
            im = im.convert("RGB") if im.mode not in ("RGB", "L", "RGBA") else im
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=False)
            return buf.getvalue()
    except (OSError, ValueError):
        return None
