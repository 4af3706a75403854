"""Faults a new user hits on the command line: YAML syntax errors, bad --out paths, argument errors
(issue "Faults a new user hits"). Config errors exit 2, other user errors 1, argparse errors 2."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from twostage import api, cli
from twostage.config import ConfigError, parse_overrides, read_source

BAD_YAML = "model:\n  base_channels: 16\n  channel_mult: [1, 2\ntrain:\n  steps: 3\n"  # unclosed [ on line 3


def _no_work(monkeypatch):
    """Make every command body fail loudly: a check that is meant to come first must stop the command."""
    for name in ("train_tokenizer", "encode", "train_generator", "sample", "load_tokenizer"):
        monkeypatch.setattr(api, name, lambda *a, **k: pytest.fail("the command started its work"))


# -- 3. YAML syntax errors -------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+, column \d+: invalid YAML") as err:
        read_source(bad)
    assert str(bad) in str(err.value)
    line = int(str(err.value).split(", line ")[1].split(",")[0])
    assert line == 4 and "starts on line 3" in str(err.value)  # the unclosed list of line 3, noticed on 4
    code = cli.main(["tokenizer", "train", str(bad), "--out", str(tmp_path / "run")])
    text = capsys.readouterr().err
    assert code == 2 and text.startswith("config error: ") and str(bad) in text and f"line {line}" in text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text


def test_yaml_syntax_error_in_a_base_chain(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    mid = tmp_path / "mid.yaml"
    mid.write_text(f"base: {bad}\ntrain:\n  steps: 5\n")
    top = tmp_path / "top.yaml"
    top.write_text(f"base: {mid}\n")
    with pytest.raises(ConfigError) as err:
        read_source(top)
    msg = str(err.value)
    assert msg.startswith(f"{bad}, line ") and "invalid YAML" in msg
    assert f"{top} -> {mid}" in msg  # how the bad file was reached
    # a broken file in the middle of the chain is named with its own line
    mid.write_text(f"base: {bad}\ntrain: {{steps: 5\n")
    with pytest.raises(ConfigError, match=rf"{mid}, line \d+, column \d+ \(reached through base: from {top}\)"):
        read_source(top)
    # an override whose value is not valid YAML is a config error too
    with pytest.raises(ConfigError, match=r"override 'train.steps=\[1,'"):
        parse_overrides(["train.steps=[1,"])


# -- 4. --out problems -----------------------------------------------------------------------------


def test_out_that_is_an_existing_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    f = tmp_path / "not_a_folder"
    f.write_text("x")
    for argv in (["tokenizer", "train", "vq_fmnist_f4", "--out", str(f)],
                 ["tokenizer", "encode", str(tmp_path / "run"), "--out", str(f), "--overwrite"],
                 ["generator", "train", "ar_fmnist_tiny", "--tokens", str(tmp_path), "--out", str(f)],
                 ["study", "run", "study_demo", "--out", str(f), "--dry-run"]):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"error: --out {f} is an existing file, but this command writes a folder there; "
                            "give a folder path"), err
        assert len(err.splitlines()) == 1
    # a path below a file
    assert cli.main(["tokenizer", "train", "vq_fmnist_f4", "--out", str(f / "run")]) == 1
    assert f"lies under {f}, which is a file" in capsys.readouterr().err
    # where a FILE is written, a folder is the mistake
    assert cli.main(["generator", "sample", str(tmp_path / "run"), "--num", "4", "--out", str(tmp_path)]) == 1
    assert f"--out {tmp_path} is a folder, but this command writes a file there" in capsys.readouterr().err


def _as_unprivileged(argv: list[str]) -> tuple[int, str]:
    """cli.main(argv) in a forked child without root rights (root may write anywhere); (exit code, stderr)."""
    cli.build_parser()  # import every command module now: the child may not read /root's files
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            sys.stderr = os.fdopen(w, "w")
            code = cli.main(argv)
            sys.stderr.flush()
        except BaseException as err:  # noqa: BLE001 - report anything, exit the child in every case
            try:
                sys.stderr.write(f"child raised {err!r}\n")
                sys.stderr.flush()
            except Exception:
                pass
            code = getattr(err, "code", 98) if isinstance(err, SystemExit) else 98
        os._exit(int(code or 0))
    os.close(w)
    with os.fdopen(r) as fh:
        err = fh.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_out_in_a_read_only_folder_fails_before_any_work(monkeypatch):
    _no_work(monkeypatch)
    base = Path(tempfile.mkdtemp(prefix="twostage-ro-"))  # /tmp: reachable by the unprivileged child
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o555)  # r-x for everyone
        code, err = _as_unprivileged(["tokenizer", "encode", str(base / "run"), "--out", str(ro / "cache")])
        assert code == 1, err
        assert err.strip() == (f"tokenizer error: --out {ro / 'cache'} cannot be created: {ro} is not writable "
                               "by this user (read-only or permission denied)")
        code, err = _as_unprivileged(["tokenizer", "train", "vq_fmnist_f4", "--out", str(ro)])
        assert code == 1 and f"--out {ro} is not writable by this user" in err, err
    finally:
        (base / "ro").chmod(stat.S_IRWXU)
        for p in sorted(base.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        base.rmdir()


def test_out_problem_accepts_what_commands_create_or_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "samples.npz").write_bytes(b"")
    assert cli.out_problem(tmp_path / "run", cli.OUT_FOLDER) is None  # resume into an existing run folder
    assert cli.out_problem(tmp_path / "new" / "deeper" / "run", cli.OUT_FOLDER) is None  # parents get made
    assert cli.out_problem(tmp_path / "samples.npz", cli.OUT_FILE) is None  # overwrite a file
    assert cli.out_problem(tmp_path / "x" / "s.npz", cli.OUT_FILE) is None


def test_every_out_option_is_declared_folder_or_file():
    parser = cli.build_parser()
    declared = {}
    for path, p in cli._parsers(parser):
        if any("--out" in a.option_strings for a in p._actions):
            declared[path] = p.get_default("out_kind")
    assert set(cli.OUT_KINDS) <= set(declared), set(cli.OUT_KINDS) - set(declared)
    assert all(kind in (cli.OUT_FOLDER, cli.OUT_FILE) for kind in declared.values()), declared


# -- 5. argument errors print the subcommand's usage -----------------------------------------------


def test_unknown_option_prints_the_subcommands_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["tokenizer", "train", "vq_fmnist_f4", "--out", str(tmp_path / "run"), "--bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: twostage tokenizer train ")
    assert "twostage tokenizer train: error: unrecognized arguments: --bogus" in err
    # only the unknown ones are named; an override next to them is not
    with pytest.raises(SystemExit):
        cli.main(["tokenizer", "train", "vq_fmnist_f4", "--bogus", "train.steps=2", "--out", str(tmp_path / "r")])
    assert "unrecognized arguments: --bogus\n" in capsys.readouterr().err
    # a command without overrides refuses key=value words, with its own usage too
    with pytest.raises(SystemExit):
        cli.main(["data", "info", "fashion-mnist", "x=1"])
    err = capsys.readouterr().err
    assert err.startswith("usage: twostage data info ") and "twostage data info: error: unrecognized arguments: x=1" in err
    # a missing required option was already the subcommand's
    with pytest.raises(SystemExit):
        cli.main(["generator", "train", "ar_fmnist_tiny", "--out", str(tmp_path / "g")])
    assert capsys.readouterr().err.startswith("usage: twostage generator train ")


def test_overrides_may_stand_after_options(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_train(cfg, out, **kwargs):
        seen["cfg"], seen["out"] = cfg, out
        return {}

    monkeypatch.setattr(api, "train_tokenizer", fake_train)
    argv = ["tokenizer", "train", "vq_fmnist_f4", "train.steps=7", "--out", str(tmp_path / "run"),
            "model.codebook_size=64", "--resume-with-changes", "train.seed=3"]
    assert cli.main(argv) == 0
    cfg = seen["cfg"]
    assert (cfg.train.steps, cfg.model.codebook_size, cfg.train.seed) == (7, 64, 3)
    assert cli.main(["tokenizer", "train", "vq_fmnist_f4", "--out", str(tmp_path / "run"), "model.bogus_key=1"]) == 2
    assert "unknown config key 'model.bogus_key'" in capsys.readouterr().err
    # the generator's --out and --tokens take several paths (replicas) and give overrides back the same way
    monkeypatch.setattr(api, "train_generator", lambda cfg, cache, out, **kw: seen.update(cfg=cfg, out=out) or {})
    argv = ["generator", "train", "ar_fmnist_tiny", "--tokens", str(tmp_path / "c"), "train.steps=5",
            "--out", str(tmp_path / "gen"), "train.seed=4"]
    assert cli.main(argv) == 0
    assert (seen["cfg"].train.steps, seen["cfg"].train.seed, seen["out"]) == (5, 4, tmp_path / "gen")
    assert cli.main(["generator", "train", "ar_fmnist_tiny", "--tokens", str(tmp_path / "c"), "--out",
                     "train.steps=5"]) == 2
    assert "--out is followed by overrides only" in capsys.readouterr().err
