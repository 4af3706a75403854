"""The report's figures, as PNG files (matplotlib's Agg renderer through `Figure` directly: no pyplot,
so no global backend state and nothing tries to open a window).

Every function takes plain data (cells, fits, frontier dicts, display labels and colours keyed by
tokenizer cell) and writes one PNG. Metric names come from the caller, who takes them from the table
(gfd_name), so a figure never calls an FD-EffNetLite0 an "FID". Error bars are 95% intervals over
seeds wherever a value has them; single seeds are drawn as small dots. The PNGs carry no
software-version metadata, so the same table gives byte-identical files with the same fonts.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from twostage.study.fit import FitResult
from twostage.study.frontier import finite

__all__ = ["tokenizer_colors", "metric_vs_compute", "differences_plot", "frontier_plot", "per_position",
           "rfd_vs_gfd", "training_curves", "grid_thumbnail", "class_grid"]

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


def _yerr(points: Sequence[Mapping]) -> np.ndarray:
    """Asymmetric error bars from low/high (0 where a point has no interval)."""
    lo = [p["mean"] - p["low"] if finite(p.get("low")) else 0.0 for p in points]
    hi = [p["high"] - p["mean"] if finite(p.get("high")) else 0.0 for p in points]
    return np.clip(np.array([lo, hi]), 0.0, None)


def metric_vs_compute(path: Path, cells: Sequence[Mapping], fits: Mapping[str, FitResult], ylabel: str, title: str,
                      labels: Mapping[str, str], colors: Mapping[str, Any]) -> Path:
    """Log-log plot of one metric against compute: per cell its mean over seeds with the 95% interval
    as an error bar and every seed as a small dot; one colour per tokenizer, one marker per generator
    size; each fitted law drawn solid over its own points' range. cell: {tokenizer_id, generator_size,
    compute, mean, low, high, seeds}."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    sizes = sorted({str(c.get("generator_size")) for c in cells})
    marker = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(sizes)}
    for tid in sorted({c["tokenizer_id"] for c in cells}):
        mine = [c for c in cells if c["tokenizer_id"] == tid]
        for s in sizes:
            pts = sorted((c for c in mine if str(c.get("generator_size")) == s), key=lambda c: c["compute"])
            if not pts:
                continue
            seeds = [(p["compute"], v) for p in pts for v in p.get("seeds", ())]
            if seeds and len(seeds) > len(pts):
                ax.scatter(*zip(*seeds), color=colors[tid], marker=".", s=8, alpha=0.45, edgecolors="none")
            ax.errorbar([p["compute"] for p in pts], [p["mean"] for p in pts], yerr=_yerr(pts), color=colors[tid],
                        marker=marker[s], ms=5, ls="none", capsize=3, elinewidth=1, alpha=0.9)
        f = fits.get(tid)
        if f is not None and f.ok:
            lo, hi = f.compute_range
            grid = np.geomspace(lo, hi, 100)
            ax.plot(grid, f.predict(grid), color=colors[tid], lw=1.8, label=f"{labels[tid]} ({_fmt_param(f)})")
        else:
            ax.plot([], [], color=colors[tid], lw=1.8, label=f"{labels[tid]} (no fit)")
    for s in sizes:
        ax.scatter([], [], color="gray", marker=marker[s], label=f"generator {s}")
    ax.errorbar([], [], yerr=[], color="gray", ls="none", capsize=3, label="mean, 95% CI over seeds")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def differences_plot(path: Path, rows: Sequence[Mapping], xlabel: str, title: str) -> Path:
    """Forest plot of paired differences: one line per comparison {label, mean, low, high, verdict},
    the 95% interval as a bar (a dot alone: no interval), 0 dashed. Bars that exclude 0 are dark."""
    fig = Figure(figsize=(8, 0.9 + 0.32 * max(1, len(rows))))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows):
        resolved = finite(r.get("low")) and finite(r.get("high"))
        clear = resolved and (r["low"] > 0 or r["high"] < 0)
        color = "#1f4e79" if clear else "#999999"
        if resolved:
            ax.plot([r["low"], r["high"]], [yi, yi], color=color, lw=2.2)
        ax.plot([r["mean"]], [yi], marker="o" if resolved else "x", color=color, ms=5)
    ax.axvline(0.0, color="k", ls="--", lw=1)
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def frontier_plot(path: Path, panels: Sequence[dict], labels: Mapping[str, str],
                  colors: Mapping[str, Any]) -> Path:
    """One panel per analysed series: every fitted law thin, their minimum thick in the colour of
    the optimal tokenizer, crossovers as dotted verticals with their seed interval shaded, and the
    empirical lower envelope of cell means as black-edged markers.
    panel: {title, ylabel, fits, optimal, envelope, crossovers (with low/high, optional)}."""
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
        for x in p.get("crossovers") or opt["crossovers"]:
            ax.axvline(x["compute"], color="k", ls=":", lw=1)
            if finite(x.get("low")) and finite(x.get("high")):
                ax.axvspan(x["low"], x["high"], color="k", alpha=0.08, lw=0,
                           label="crossover, 95% interval over seeds")
            ax.text(x["compute"], 0.02, f" {x['compute']:.2e}", transform=ax.get_xaxis_transform(), fontsize=7,
                    rotation=90, va="bottom", ha="right")
        for e in p["envelope"]:
            ax.scatter([e["compute"]], [e["value"]], color=colors[e["tokenizer_id"]], edgecolors="k",
                       marker="*", s=90, zorder=5)
        ax.scatter([], [], color="w", edgecolors="k", marker="*", s=90, label="best cell mean so far (envelope)")
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


def per_position(path: Path, curves: Sequence[Mapping], labels: Mapping[str, str],
                 colors: Mapping[str, Any]) -> Path | None:
    """Validation loss per token position, one line per tokenizer: the mean over the seeds of its
    largest-compute AR cell, shaded between the lowest and highest seed. curve: {tokenizer_id,
    generator_label, compute, runs: [[loss per position], ...]}. None when there is nothing to draw."""
    if not curves:
        return None
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for c in sorted(curves, key=lambda c: c["tokenizer_id"]):
        v = np.asarray(c["runs"], dtype=np.float64)
        x = np.arange(1, v.shape[1] + 1)
        tid = c["tokenizer_id"]
        n = v.shape[0]
        ax.plot(x, v.mean(0), color=colors[tid], lw=1.5, label=f"{labels[tid]} — {c['generator_label']} "
                f"(C={c['compute']:.2e}, {n} seed{'s' if n > 1 else ''})")
        if n > 1:
            ax.fill_between(x, v.min(0), v.max(0), color=colors[tid], alpha=0.2, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("token position (1 = first token, raster order)")
    ax.set_ylabel("validation cross-entropy (nats/token)")
    ax.set_title("AR validation loss per position, largest-compute cell of each tokenizer (band: seed range)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def rfd_vs_gfd(path: Path, points: Sequence[Mapping], rfd_name: str, gfd_name: str,
               labels: Mapping[str, str], colors: Mapping[str, Any]) -> Path | None:
    """Tokenizers' reconstruction FD against the best generation FD of their cells (with 95%
    intervals over seeds where they exist), the Pareto set joined by a line, and gFD = rFD (the floor
    a generator cannot beat by much) dashed."""
    pts = [p for p in points if p["rfd"] is not None and p["best_gfd"] is not None]
    if not pts:
        return None
    fig = Figure(figsize=(6.5, 5))
    ax = fig.add_subplot()
    for p in pts:
        tid = p["tokenizer_id"]
        xerr = _yerr([{"mean": p["rfd"], "low": p.get("rfd_low"), "high": p.get("rfd_high")}])
        yerr = _yerr([{"mean": p["best_gfd"], "low": p.get("gfd_low"), "high": p.get("gfd_high")}])
        ax.errorbar([p["rfd"]], [p["best_gfd"]], xerr=xerr, yerr=yerr, color=colors[tid], ls="none", capsize=3,
                    elinewidth=1)
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
    ax.set_ylabel(f"best {gfd_name} (cell mean over seeds)")
    ax.set_title("Reconstruction vs generation quality per tokenizer")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# training_curves: series key -> (line style, legend suffix)
_CURVE_STYLES = {"rfd": ({"marker": "o", "ms": 3.5, "lw": 1.5}, ""),
                 "psnr": ({"marker": "o", "ms": 3.5, "lw": 1.5}, ""),
                 "train_usage": ({"lw": 1.0, "alpha": 0.8}, " (training window)"),
                 "codebook_usage": ({"marker": "s", "ms": 4, "ls": "none"}, " (validation images)")}


def training_curves(path: Path, title: str, rfd_name: str,
                    seeds: Mapping[int, Mapping[str, Sequence[tuple[int, float]]]]) -> Path | None:
    """One tokenizer's training curves in three panels against the training step: validation rFD (log
    scale), validation PSNR, and codebook usage (the training log's window statistic as a line, the
    validation images' usage as markers); one colour per seed. seeds: {seed: {"rfd", "psnr",
    "codebook_usage", "train_usage": [(step, value), ...]}}. None when there is nothing to draw."""
    if not any(pts for series in seeds.values() for pts in series.values()):
        return None
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(13, 3.6))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    panels = [(axes[0], ("rfd",), f"validation {rfd_name}"), (axes[1], ("psnr",), "validation PSNR (dB)"),
              (axes[2], ("train_usage", "codebook_usage"), "codebook usage (fraction of codes)")]
    for ax, keys, ylabel in panels:
        drawn = False
        for i, (seed, series) in enumerate(sorted(seeds.items())):
            for key in keys:
                pts = series.get(key) or []
                if not pts:
                    continue
                style, what = _CURVE_STYLES[key]
                ax.plot(*zip(*pts), color=cmap(i % cmap.N), label=f"seed {seed}{what}", **style)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="gray")
        elif keys == ("rfd",) and all(v > 0 for s in seeds.values() for _, v in s.get("rfd") or []):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _png(im: Image.Image, max_side: int) -> bytes:
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def grid_thumbnail(path: Path, max_side: int = 1024) -> bytes | None:
    """A sample grid PNG's bytes, downscaled (and re-encoded) when a side exceeds max_side so that
    a report of many large grids stays small. None when the file is missing or unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            if max(im.size) <= max_side and im.format == "PNG":
                return Path(path).read_bytes()
            im = im.convert("RGB") if im.mode not in ("RGB", "L", "RGBA") else im
            return _png(im, max_side)
    except (OSError, ValueError):
        return None


def _npy_member(z: zipfile.ZipFile, names: Sequence[str]) -> str | None:
    return next((f"{n}.npy" for n in names if f"{n}.npy" in z.namelist()), None)


def _read_rows(path: Path, member: str, indices: Sequence[int]) -> np.ndarray:
    """Rows `indices` (ascending) of an array stored in an .npz, reading only those rows when the
    member is stored uncompressed (np.savez): a 50k-image samples file is not loaded whole."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
        with z.open(member) as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            header = f.tell()
            if fortran or dtype.hasobject:
                raise ValueError("unsupported array layout")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            if info.compress_type != zipfile.ZIP_STORED:
                data = f.read()
                flat = np.frombuffer(data, dtype=dtype).reshape(shape)
                return flat[list(indices)].copy()
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len + header
        out = []
        for i in indices:
            raw.seek(start + int(i) * row)
            out.append(np.frombuffer(raw.read(row), dtype=dtype).reshape(shape[1:]))
    return np.stack(out)


def class_grid(path: Path, per_class: int = 8, max_classes: int = 20, max_side: int = 1024) -> tuple[bytes, int, int] | None:
    """A grid with one row per class (the first `per_class` samples of each) from a samples file
    (uint8 NHWC images with their labels, as `generator sample` writes; ADM's arr_0/arr_1 also
    read), so every class shows however the file is ordered. With more than max_classes classes,
    max_classes of them evenly spaced. Returns (PNG bytes, classes shown, classes in the file), or
    None when the file is missing or not a samples file."""
    try:
        with zipfile.ZipFile(path) as z:
            images, labels = _npy_member(z, ("images", "arr_0")), _npy_member(z, ("labels", "arr_1"))
            if images is None or labels is None:
                return None
            with z.open(labels) as f:
                y = np.lib.format.read_array(f).astype(np.int64).ravel()
        classes = np.unique(y)
        shown = classes if len(classes) <= max_classes else \
            classes[np.round(np.linspace(0, len(classes) - 1, max_classes)).astype(int)]
        picks = [np.flatnonzero(y == c)[:per_class] for c in shown]
        order = sorted({int(i) for p in picks for i in p})
        data = dict(zip(order, _read_rows(path, images, order)))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error):
        return None
    first = next(iter(data.values()))
    if first.ndim == 2:
        data = {k: v[..., None] for k, v in data.items()}
        first = first[..., None]
    if first.ndim != 3 or first.dtype != np.uint8:
        return None
    h, w, ch = first.shape
    pad = 2
    grid = np.full((len(shown) * (h + pad) + pad, per_class * (w + pad) + pad, ch), 255, dtype=np.uint8)
    for r, p in enumerate(picks):
        for c, i in enumerate(p):
            grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = data[int(i)]
    im = Image.fromarray(grid[..., 0] if ch == 1 else grid[..., :3])
    scale = max(1, min(4, 512 // max(grid.shape[:2])))  # small images (32px) are shown enlarged
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    return _png(im, max_side), len(shown), len(classes)
