"""`twostage study report`: files, content, determinism, CLI, degenerate tables, the verdict-first
report of a replicated study (sections in order, verdicts, error bars, class grids), and the HTML in
a real headless Chromium (loads offline without console errors, every image decoded, sections in
order). The statistics behind the verdicts are tested in tests/test_study_fit.py."""

from __future__ import annotations

import argparse
import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from study_synthetic import GFD_NAME, TOKENIZERS, VERDICT_TOKENIZERS, make_rows, write_results
from twostage.study.render import SECTIONS
from twostage import cli
from twostage.study.report import analyze, build_report, cmd_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A one-seed table written before the replicate columns existed."""
    d = write_results(tmp_path_factory.mktemp("study"), noise=0.02, seed=1)
    return d, build_report(d, n_boot=40)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    """3 generator seeds x 2 evaluation seeds per cell; CRT clearly better than baseline, twin = baseline's
    laws; a generator seed moves every tokenizer alike (sd_shared), which pairing removes."""
    rows = make_rows(tokenizers=VERDICT_TOKENIZERS + TOKENIZERS[:1], generator_seeds=[0, 1, 2], eval_seeds=[0, 1],
                     sd_shared=0.1, sd_generator=0.03, sd_eval=0.02, seed=3)
    d = write_results(tmp_path_factory.mktemp("replicated"), rows)
    return d, build_report(d, n_boot=40)


def test_report_files_and_content(study):
    d, paths = study
    out = d / "report"
    assert {p.name for p in out.iterdir()} >= {"report.html", "fits.json", "summary.md", "frontier.png",
                                               "per_position.png", "rfd_vs_gfd.png"}
    fits = json.loads((out / "fits.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in fits.json"))
    assert len(fits["fits"]) == 6  # AR loss x2, DiT loss x1, gFD x3
    for f in fits["fits"]:
        assert f["status"] == "ok", f
        for method in ("cov", "bootstrap"):
            assert set(f["ci"][method]) == {"alpha", "lambda", "l_min"}
    assert fits["metadata"]["results_sha256"] and "date" not in json.dumps(fits["metadata"])
    # The gFD laws of the two VQ tokenizers cross inside the sweep (the fixture is built that way).
    gfd = next(o for o in fits["optimal"] if o["series"] == GFD_NAME)
    assert [(x["from"], x["to"]) for x in gfd["crossovers"]] == [("tokf8k1024", "tokf4k1024")]
    assert 5e13 < gfd["crossovers"][0]["compute"] < 3e14

    page = (out / "report.html").read_text()
    for needed in ("2000", "sha256:0123abcd", "fashion-mnist:test@32px", "ar-kv-cache", "flow-euler", "cfg_scale",
                   "crossover at C =", "vq f8 K1024 → vq f4 K1024 +CRT", "rFD-EffNetLite0", "Pareto",
                   "Sample grids", "val loss (AR cross-entropy, nats/token)", "cov CI", "tokens/image",
                   "different prediction tasks"):
        assert needed in page, needed
    assert GFD_NAME in page and not re.search(r"\bFID\b", page)  # the metric keeps its network's name
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Study synthetic") and "| vq f4 K1024 +CRT |" in summary and "crossover" in summary
    # One seed per cell: the report says so and never names a winner.
    for text in (page, summary):
        assert "1 seed: no interval" in text and "has lower" not in text
        assert not re.search(r"(K1024|CRT|VF) better", text)
    assert all(v["winner"] is None for v in fits["verdicts"]) and fits["verdicts"]
    assert page.index("What the study found") < page.index("<img")


def test_report_is_self_contained(study):
    d, _ = study
    page = (d / "report" / "report.html").read_text()
    assert not re.search(r"<script|<link|@import|url\(", page, re.I)
    assert not re.search(r"(src|href)\s*=\s*\"(?!data:)", page, re.I)
    srcs = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    assert len(srcs) == page.count("<img") >= 6 + 3  # 6 figures, a grid per tokenizer
    for s in srcs:
        with Image.open(io.BytesIO(base64.b64decode(s))) as im:
            assert im.format == "PNG" and min(im.size) > 0


def test_same_table_gives_identical_files(study, tmp_path):
    d, paths = study
    again = build_report(d, tmp_path / "again", n_boot=40)
    for key, p in paths.items():
        assert again[key].read_bytes() == p.read_bytes(), key


def test_cli_registers_under_study_and_writes_report(study, tmp_path, capsys):
    d, _ = study
    top = cli.build_parser()
    args = top.parse_args(["study", "report", str(d), "--out", str(tmp_path / "r"), "--bootstrap", "0",
                           "--fit-points", "all"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r" / "report.html")
    fits = json.loads((tmp_path / "r" / "fits.json").read_text())
    assert fits["metadata"]["fit_points"] == "all" and all(f["n_points"] == 10 for f in fits["fits"])
    assert all("bootstrap" not in f["ci"] for f in fits["fits"])
    with pytest.raises(SystemExit):
        top.parse_args(["study", "report", str(d), "--bootstrap", "-1"])
    assert "must be >= 0" in capsys.readouterr().err
    missing = top.parse_args(["study", "report", str(tmp_path / "nothing")])
    assert cmd_report(missing) == 2 and "does not exist" in capsys.readouterr().err


def test_twostage_command_has_study_report_when_the_group_exists(study, tmp_path):
    from twostage import cli

    parser = cli.build_parser()
    groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "study" not in groups.choices:
        pytest.skip("the `twostage study` command group is not registered yet")
    assert cli.main(["study", "report", str(study[0]), "--out", str(tmp_path / "c"), "--bootstrap", "0"]) == 0
    assert (tmp_path / "c" / "report.html").is_file()


def test_degenerate_table_still_reports(tmp_path):
    rows = make_rows(steps=[1000, 4000], sizes={"small": 2_000_000})  # 2 budgets: nothing can be fitted
    for r in rows:
        r["val_loss_per_position"] = None
        if r["tokenizer_id"] == "klf4d8vf":
            r["gfd"] = None
    write_results(tmp_path, rows, grids=False)
    paths = build_report(tmp_path, n_boot=10)
    page = paths["html"].read_text()
    assert "not enough points to fit" in page and "sample grid of cell" in page
    assert "per_position.png" not in {p.name for p in (tmp_path / "report").iterdir()}
    fits = json.loads(paths["fits"].read_text())
    assert {f["status"] for f in fits["fits"]} == {"insufficient"}
    assert all(o["segments"] == [] for o in fits["optimal"])


def _positions(page: str) -> list[int]:
    return [page.index(f'<section id="{name}">') for name in SECTIONS]


def test_replicated_study_report_opens_with_its_verdicts(replicated):
    d, paths = replicated
    page, summary = paths["html"].read_text(), paths["summary"].read_text()
    assert _positions(page) == sorted(_positions(page))  # found, figures, grids, ..., protocol last
    assert page.index("What the study found") < page.index("<img") and page.index('id="protocol"') > page.index("<h2>Runs")
    fits = json.loads(paths["fits"].read_text())
    # The same verdict lines in report.html, summary.md and fits.json.
    lines = [x for f in fits["findings"] for x in f["lines"]]
    assert any(x.startswith("At budget 2000 steps (ar small") and "CRT has lower FD-EffNetLite0 than baseline: −" in x
               and "over 3 paired generator seeds" in x for x in lines)
    for x in lines:
        assert f"- {x}" in summary
        assert x.replace("&", "&amp;") in page or x.replace("'", "&#x27;") in page
    verdicts = [v for v in fits["verdicts"] if v["series"] == GFD_NAME]
    pair = lambda v: {v["a"], v["b"]}
    crt = [v for v in verdicts if pair(v) == {"crt", "base"}]
    assert len(crt) == 10 and all(v["winner"] == "CRT" and v["difference"]["high"] < 0 for v in crt)
    twin = [v for v in verdicts if pair(v) == {"twin", "base"}]  # no true difference
    assert sum(v["verdict"] == "not distinguishable with 3 seeds" for v in twin) >= 8
    loss = [v for v in fits["verdicts"] if v["series"].startswith("val loss") and "tokf8k1024" in pair(v)]
    assert loss and all(v["verdict"] == "not compared" for v in loss)  # 16 vs 64 tokens: other prediction task
    cells = [c for c in fits["cells"] if c["series"] == GFD_NAME]
    assert len(cells) == 40 and all(c["n"] == 3 and c["level"] == "generator seed" and c["low"] < c["mean"] < c["high"]
                                    and c["eval_sd"] > 0 and c["internal_sd"] > 0 for c in cells)
    comp = next(v for v in fits["variance_components"] if v["series"] == GFD_NAME)
    assert comp["dominant"] == "generator" and set(comp["sources"]) == {"generator", "eval"}
    x = next(o for o in fits["optimal"] if o["series"] == GFD_NAME)["crossovers"][0]
    assert (x["from"], x["to"]) == ("tokf8k1024", "crt") and x["low"] <= x["compute"] <= x["high"]
    assert x["resolved"] == (x["measured"][0] <= x["low"] and x["high"] <= x["measured"][1])
    assert all(f["seed_ci"] and f["seed_ci"]["units"] == 3 for f in fits["fits"] if f["status"] == "ok")
    assert "Error bars: 95% intervals over seeds" in page and "every class (10)" in page
    assert len(re.findall(r"alt=\"[^\"]*one row per class", page)) == 4  # one class grid per tokenizer cell
    assert "1 seed: no interval" not in summary.split("## Fits")[0]
    # summary.md lists every cell's mean and interval (the numbers a results README quotes), in the html's format
    table = summary.split("## Cell means over seeds")[1].split("\n## ")[0]
    gfd_rows = [r for r in table.splitlines() if r.startswith(f"| {GFD_NAME} |")]
    assert len(gfd_rows) == 40
    for c in (c for c in fits["cells"] if c["series"] == GFD_NAME):
        assert f"| {c['mean']:.4g} [{c['low']:.4g}, {c['high']:.4g}] | 3 |" in table


def test_class_grids_survive_the_samples(tmp_path):
    """A committed study keeps no samples: the class grids the first report built (report/grids/, which
    results/studies/keep.sh keeps) stand in for them when the report is rebuilt, with their captions."""
    rows = make_rows(tokenizers=VERDICT_TOKENIZERS[:2], sizes={"small": 2_000_000}, generator_seeds=[0, 1, 2], seed=4)
    d = write_results(tmp_path / "study", rows)
    first = build_report(d, n_boot=0)["html"].read_text()
    kept = sorted((d / "report" / "grids").glob("*.png"))
    assert len(kept) == 2 and all((p.with_suffix(".txt")).read_text().count("one row per class") == 1 for p in kept)
    shutil.rmtree(d / "samples")  # every run's samples file and sampler grid
    again = build_report(d, n_boot=0)["html"].read_text()
    assert "is missing" not in again and again.count("(the grid kept from the report made beside the samples)") >= 2
    embedded = lambda page: sorted(re.findall(r'alt="[^"]*one row per class[^"]*" src="data:image/png;base64,([^"]+)"', page))
    assert embedded(again) == embedded(first) and len(embedded(first)) == 2
    shutil.rmtree(d / "report" / "grids")
    assert build_report(d, n_boot=0)["html"].read_text().count("is missing") == 2  # nothing left: said so


def test_unbiased_metrics_are_analysed_under_their_own_names_when_present():
    rows = make_rows(tokenizers=VERDICT_TOKENIZERS[:2], sizes={"small": 2_000_000}, generator_seeds=[0, 1, 2],
                     sd_generator=0.02, unbiased=True, seed=2)
    a = analyze(rows, n_boot=0)
    names = [s["name"] for s in a["series"]]
    assert names == [GFD_NAME, "FDinf-EffNetLite0", "KID-EffNetLite0", "val loss (AR cross-entropy, nats/token)"]
    for s in a["series"]:
        assert all(c.interval.n == 3 for c in s["cells"]) and s["headline"]
        if s["metric"] in ("gfd_inf", "kid"):  # the evaluation's own sd from its stderr column
            col = {"gfd_inf": "gfd_inf_stderr", "kid": "kid_stderr"}[s["metric"]]
            c = s["cells"][0]
            assert c.internal_sd == pytest.approx(sum(r[col] for r in c.rows) / len(c.rows))
        assert all(c.winner == "CRT" for c in s["comparisons"])
    assert any("FDinf-EffNetLite0 at each budget" == t for t, _ in a["findings"])


def test_replicated_report_is_deterministic(replicated, tmp_path):
    d, paths = replicated
    again = build_report(d, tmp_path / "again", n_boot=40)
    for key, p in paths.items():
        assert again[key].read_bytes() == p.read_bytes(), key


def test_mixed_protocols_and_metric_names_are_flagged():
    rows = make_rows(steps=[500, 1000, 2000, 4000])
    rows[0]["gen_protocol"] = json.dumps({**json.loads(rows[0]["gen_protocol"]), "num_samples": 500})
    rows[1]["gfd_name"] = "FID"
    a = analyze(rows, n_boot=0)
    assert any("num_samples differs" in w for w in a["warnings"])
    assert any("several gfd_name" in w for w in a["warnings"])
    assert {s["name"] for s in a["series"] if s["metric"] == "gfd"} == {"FID", GFD_NAME}


# -- headless Chromium through the DevTools protocol over --remote-debugging-pipe (stdlib only) ------

class _Pipe:
    """DevTools protocol over the pipe Chromium opens on fds 3 (commands in) and 4 (messages out):
    NUL-terminated JSON. Events that arrive while waiting for a reply are kept in `events`."""

    def __init__(self, user_dir: Path):
        cmd_r, self._w = os.pipe()
        self._r, out_w = os.pipe()

        def onto_3_and_4():
            # dup2 onto 3/4 clears close-on-exec; going through fds >= 10 first keeps dup2 from being
            # a no-op when a pipe end already happens to be fd 3 or 4.
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}",
                                      "--remote-debugging-pipe", "about:blank"], close_fds=False,
                                     preexec_fn=onto_3_and_4, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id, self.events = b"", 0, []

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no message from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: str | None = None, timeout: float = 15, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            hit = next((e for e in self.events if e.get("method") == method), None)
            if hit:
                return hit
            self.events.append(self._next(deadline))

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


def chromium_check(page: Path, user_dir: Path, screenshot: Path | None = None) -> dict:
    """Open `page` in headless Chromium; return console/exception/log errors, requests that left the
    file (anything but file:, data:, about:), and per image (complete, naturalWidth, alt)."""
    cdp = _Pipe(user_dir)
    try:
        target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
        session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable", session)
        cdp.call("Emulation.setDeviceMetricsOverride", session, width=1400, height=1000, deviceScaleFactor=1,
                 mobile=False)
        cdp.call("Page.navigate", session, url=page.resolve().as_uri())
        cdp.wait_event("Page.loadEventFired")
        images = cdp.call("Runtime.evaluate", session, returnByValue=True, expression=(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])"))["result"]["value"]
        height = cdp.call("Runtime.evaluate", session, returnByValue=True,
                          expression="document.documentElement.scrollHeight")["result"]["value"]
        sections = cdp.call("Runtime.evaluate", session, returnByValue=True, expression=(
            "Array.from(document.querySelectorAll('section')).map(s => [s.id, "
            "s.getBoundingClientRect().top + window.scrollY, s.getBoundingClientRect().height])"))["result"]["value"]
        if screenshot is not None:
            shot = cdp.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": 1400, "height": min(height, 6000), "scale": 1})
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors = []
        for e in cdp.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                errors.append(p["entry"].get("text"))
        requests = [e["params"]["request"]["url"] for e in cdp.events if e.get("method") == "Network.requestWillBeSent"]
        external = [u for u in requests if not u.startswith(("file:", "data:", "about:"))]
        return {"errors": errors, "external_requests": external, "images": images, "height": height,
                "sections": sections}
    finally:
        cdp.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("which", ["study", "replicated"])
def test_report_opens_in_headless_chromium(which, request, tmp_path):
    d, paths = request.getfixturevalue(which)
    shot = tmp_path / "report.png"
    result = chromium_check(paths["html"], tmp_path / "profile", screenshot=shot)
    assert result["errors"] == []
    assert result["external_requests"] == []
    assert len(result["images"]) >= 9
    for complete, width, alt in result["images"]:
        assert complete and width > 0, alt
    # The verdicts first, laid out on the page in the documented order, each section visible.
    ids = [s[0] for s in result["sections"]]
    assert ids == [s for s in SECTIONS if s in ids] and ids[0] == "found" and ids[-1] == "protocol"
    assert {"found", "figures", "cells", "comparisons", "fits", "protocol"} <= set(ids)
    tops = [s[1] for s in result["sections"]]
    assert tops == sorted(tops) and all(s[2] > 0 for s in result["sections"]) and tops[0] < 200
    if which == "replicated":
        assert "grids" in ids
        assert sum("one row per class" in alt for _, _, alt in result["images"]) == 4
    with Image.open(shot) as im:
        assert im.size[0] == 1400 and im.size[1] > 1000
        assert len(im.convert("L").getcolors(1 << 16) or range(2)) > 1  # not a blank page


def test_large_sample_grids_are_downscaled_and_missing_ones_skipped(tmp_path):
    from twostage.study.plots import grid_thumbnail

    big = tmp_path / "big.png"
    Image.new("RGB", (2048, 1024), (10, 200, 30)).save(big)
    with Image.open(io.BytesIO(grid_thumbnail(big))) as im:
        assert im.format == "PNG" and im.size == (1024, 512)
    small = tmp_path / "small.png"
    Image.new("L", (64, 32)).save(small)
    assert grid_thumbnail(small) == small.read_bytes()  # embedded as written
    assert grid_thumbnail(tmp_path / "absent.png") is None
    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert grid_thumbnail(tmp_path / "broken.png") is None


def test_class_grid_shows_every_class_from_the_samples_file(tmp_path):
    import numpy as np

    from twostage.study.plots import class_grid

    labels = np.repeat(np.arange(10), 30)  # grouped by class, as the sampler writes: the first 64 are 3 classes
    images = np.stack([np.full((8, 8, 3), 25 * y, np.uint8) for y in labels])
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images, arr_1=labels)  # ADM layout, compressed
    for name in ("s.npz", "c.npz"):
        data, shown, total = class_grid(tmp_path / name, per_class=4)
        assert (shown, total) == (10, 10)
        with Image.open(io.BytesIO(data)) as im:
            px = np.asarray(im.convert("RGB"))
        scale = px.shape[0] // (10 * 10 + 2)  # rows of 8 px + 2 px padding, enlarged for small images
        rows = [px[(2 + r * 10 + 4) * scale, (2 + 4) * scale, 0] for r in range(10)]
        assert rows == [25 * y for y in range(10)]  # one row per class, in class order
    many = np.repeat(np.arange(50), 2)
    np.savez(tmp_path / "m.npz", images=np.zeros((100, 4, 4, 1), np.uint8), labels=many)
    assert class_grid(tmp_path / "m.npz", max_classes=20)[1:] == (20, 50)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert class_grid(tmp_path / "bad.npz") is None and class_grid(tmp_path / "absent.npz") is None


def test_figures_draw_error_bars_over_seeds(tmp_path):
    from twostage.study.plots import differences_plot, metric_vs_compute, tokenizer_colors

    cells = [{"tokenizer_id": "a", "generator_size": "s", "compute": c, "mean": m, "seeds": [m - 1, m, m + 1]}
             for c, m in ((1e13, 30.0), (1e14, 20.0), (1e15, 15.0))]
    with_ci = [{**c, "low": c["mean"] - 2, "high": c["mean"] + 2} for c in cells]
    without = [{**c, "low": float("nan"), "high": float("nan")} for c in cells]  # one seed: no interval
    args = ({}, "FD", "FD vs compute", {"a": "A"}, tokenizer_colors(["a"]))
    p1 = metric_vs_compute(tmp_path / "ci.png", with_ci, *args)
    p2 = metric_vs_compute(tmp_path / "none.png", without, *args)
    assert p1.read_bytes() != p2.read_bytes()
    with Image.open(p1) as a, Image.open(p2) as b:  # the bars add dark pixels above and below the markers
        dark = lambda im: sum(n for n, v in im.convert("L").getcolors(1 << 16) if v < 200)
        assert dark(a) > dark(b)
    p3 = differences_plot(tmp_path / "d.png", [{"label": "x", "mean": -2.0, "low": -3.0, "high": -1.0},
                                                 {"label": "y", "mean": 0.5, "low": float("nan"), "high": float("nan")}],
                          "difference", "title")
    assert p3.is_file()


def test_paired_seed_design_is_named_and_compared_per_tokenizer_seed():
    """seeds.design: paired (one generator seed per tokenizer seed): the design line says the interval covers
    both sources together, comparisons pair by tokenizer seed, and the variance is not split into sources."""
    rows = make_rows(tokenizers=VERDICT_TOKENIZERS[:2], sizes={"small": 2_000_000}, tokenizer_seeds=[0, 1, 2],
                     generator_seeds=[0, 1, 2], sd_tokenizer=0.02, sd_generator=0.02, seed=3)
    rows = [r for r in rows if r["tokenizer_seed"] == r["generator_seed"]]
    a = analyze(rows, n_boot=0)
    assert a["design"]["seed_design"] == "paired"
    design = dict(a["findings"])["Design"]
    assert any(line.startswith("Seeds paired") for line in design)
    gfd = next(s for s in a["series"] if s["metric"] == "gfd")
    assert all(c.interval.n == 3 for c in gfd["cells"])
    assert all(c.pairing == "paired tokenizer seeds" and c.diff.n_a == 3 for c in gfd["comparisons"])
    assert all(c.winner == "CRT" for c in gfd["comparisons"])
    for c in gfd["cells"]:  # one generator seed per tokenizer seed: one merged source
        assert [x.source for x in c.components.components] == ["tokenizer+generator+eval"]
    crossed = analyze(make_rows(tokenizers=VERDICT_TOKENIZERS[:2], sizes={"small": 2_000_000},
                                tokenizer_seeds=[0, 1], generator_seeds=[0, 1], seed=3), n_boot=0)
    assert crossed["design"]["seed_design"] == "crossed"


def test_reconstruction_verdicts_are_in_the_found_section(replicated):
    d, paths = replicated
    page = paths["html"].read_text()
    found = page[page.index('<section id="found">'):page.index('<section id="figures">')]
    assert "Tokenizers: reconstruction over tokenizer seeds" in found and "PSNR" in found
    data = json.loads(paths["fits"].read_text())
    assert {v["metric"] for v in data["reconstruction_verdicts"]} >= {"rfd", "psnr", "ssim"}


def test_context_gain_compares_losses_against_each_codebook_s_own_entropy():
    """code_entropy - val_loss per AR budget: with equal code entropies the lower loss gains more from context;
    a tokenizer whose lower loss comes from a poorer code distribution (lower entropy) gains less."""
    rows = make_rows(tokenizers=VERDICT_TOKENIZERS[:2], sizes={"small": 2_000_000}, generator_seeds=[0, 1, 2],
                     sd_generator=0.02, seed=2)
    equal = analyze([{**r, "code_entropy": 7.0} for r in rows], n_boot=0)
    assert equal["context"]["comparisons"] and all(c.winner == "CRT" for c in equal["context"]["comparisons"])
    section = dict(equal["findings"])["AR context gain (unigram entropy − val loss, nats/token) at each budget"]
    assert any("CRT has higher AR context gain" in line for line in section)
    collapsed = analyze([{**r, "code_entropy": 3.0 if r["tokenizer_id"].startswith("crt") else 7.0} for r in rows],
                        n_boot=0)
    assert all(c.winner == "baseline" for c in collapsed["context"]["comparisons"])
    assert all(c.winner == "CRT" for s in collapsed["series"] if s["metric"] == "val_loss" for c in s["comparisons"])
    assert analyze(rows, n_boot=0)["context"] is None  # no code entropies (a table written before the column)


def test_tokenizers_are_also_compared_at_matched_compute_across_sizes_and_budgets():
    """Equal steps are not equal compute when tokens per image differ: a cell of one tokenizer is also set
    against the other tokenizer's cell nearest in compute at another size / budget when within 1.35x,
    with the compute ratio in the line; cells further apart, or at one (size, budget), are not paired."""
    from twostage.study.replicates import aggregate
    from twostage.study.verdicts import compare_at_matched_compute, matched_line

    rows = make_rows(tokenizers=VERDICT_TOKENIZERS[:2], sizes={"mini": 500_000, "small": 2_000_000}, steps=[800],
                     tokenizer_seeds=[0, 1, 2], generator_seeds=[0, 1, 2], sd_tokenizer=0.02, seed=4)
    rows = [r for r in rows if r["tokenizer_seed"] == r["generator_seed"]]
    compute = {("base", "mini"): 2.5e13, ("base", "small"): 1.0e14,  # 16 tokens per image: cheap steps
               ("crt", "mini"): 0.8e14, ("crt", "small"): 3.2e14}
    gfd = {("base", "mini"): 30.0, ("base", "small"): 26.0, ("crt", "mini"): 22.0, ("crt", "small"): 18.0}
    for r in rows:
        key = r["tokenizer_cell"], r["generator_size"]
        r["compute"] = compute[key]
        r["gfd"] = gfd[key] + 0.3 * r["tokenizer_seed"] * (1 if r["tokenizer_cell"] == "crt" else 0.5)
    cells = aggregate(rows, "gfd")
    labels = {"base": "baseline", "crt": "CRT"}
    matched = compare_at_matched_compute(cells, "gfd", labels)
    assert len(matched) == 1  # baseline small (1e14) vs CRT mini (0.8e14); every other pair is >= 3.2x apart
    (c,) = matched
    assert {c.a.generator_size, c.b.generator_size} == {"mini", "small"} and c.pairing == "paired tokenizer seeds"
    assert c.winner == "CRT" and c.a.generator_size == "mini"  # CRT's gFD factor wins with 0.8x the compute
    line = matched_line(c, "gFD")
    assert "CRT (ar mini 800 steps, 0.80x the compute) has lower gFD than baseline (ar small 800 steps)" in line
    assert compare_at_matched_compute(cells, "gfd", labels, ratio=1.2) == []
    # tokenizers whose steps cost the same (one grid, as study_crt's): equal steps are equal compute, no extra pairs
    same = [{**r, "compute": {"mini": 1.0e14, "small": 1.3e14}[r["generator_size"]]} for r in rows]
    assert compare_at_matched_compute(aggregate(same, "gfd"), "gfd", labels) == []
    a = analyze(rows, n_boot=0)
    found = {t: lines for t, lines in a["findings"] if "at matched compute" in t}
    fd = [lines for t, lines in found.items() if t.startswith(GFD_NAME)]  # and the val loss (one prediction task)
    assert len(fd) == 1 and "0.80x the compute" in fd[0][0]


def test_runs_of_one_spec_with_other_seeds_pool_into_one_report(tmp_path):
    """`study report DIR1 DIR2 --out OUT`: the seeds of both runs in one analysis (intervals over all of
    them, sample grids read from each run's folder); refused without --out, when the folders share a run
    or when their specs differ beyond seeds."""
    from twostage.common.errors import UserError
    from twostage.study.runner import save_spec
    from twostage.study.spec import load_spec

    rows = make_rows(tokenizers=VERDICT_TOKENIZERS[:2], sizes={"small": 2_000_000}, tokenizer_seeds=list(range(6)),
                     generator_seeds=list(range(6)), sd_tokenizer=0.05, seed=5)
    rows = [r for r in rows if r["tokenizer_seed"] == r["generator_seed"]]
    a = write_results(tmp_path / "a", [r for r in rows if r["tokenizer_seed"] < 3])
    b = write_results(tmp_path / "b", [r for r in rows if r["tokenizer_seed"] >= 3])
    spec = load_spec("study_crt")
    save_spec(spec, a)
    save_spec(load_spec("study_crt", ["seeds.tokenizer=[3,4,5]", "seeds.generator=[3,4,5]"]), b)
    paths = build_report([a, b], tmp_path / "pooled", n_boot=0)
    fits = json.loads(paths["fits"].read_text())
    assert fits["design"]["seeds"]["tokenizer"] == [0, 1, 2, 3, 4, 5]
    gfd = [v for v in fits["verdicts"] if v["metric"] == "gfd"]
    assert gfd and all(v["difference"]["n_a"] == 6 for v in gfd)
    assert not any("sample grid" in w for w in fits["warnings"])  # each grid found in its own folder
    assert "pooled" in paths["summary"].read_text().splitlines()[0]

    with pytest.raises(ValueError, match="--out"):
        build_report([a, b])
    with pytest.raises(UserError, match="count twice"):
        build_report([a, a], tmp_path / "twice", n_boot=0)
    save_spec(load_spec("study_crt", ["tokenizer.steps=2000"]), b)
    with pytest.raises(UserError, match="tokenizer.steps"):
        build_report([a, b], tmp_path / "other", n_boot=0)
