"""Shared pieces of the fault tests (tests/test_faults*.py): tiny real tokenizer runs and caches, a way to
run a `twostage` command in a subprocess that SIGKILLs itself at a chosen point, and bit-for-bit
comparison of checkpoints. No tests here.

Run as a script it is `twostage ARGS...` (twostage.cli.main) with one fault armed by the environment:

    TWOSTAGE_FAULT=after_checkpoint:K   SIGKILL once checkpoint K is written and its side work (grids,
                                        validation) has run: at the first data fetch after it
    TWOSTAGE_FAULT=in_checkpoint:K:N    SIGKILL inside the write of checkpoint K, right after its N-th
                                        safetensors file (the kill lands between files)
    TWOSTAGE_FAULT=in_encode:N          SIGKILL after the N-th batch written to a cache

The kill is a real SIGKILL (os.kill(getpid(), SIGKILL)): no finally blocks, no atexit, no flushing,
exactly what an out-of-memory killer or a pre-empted job does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent

TINY_DATA = ["data.name=npz", "data.image_size=16", "data.val_fraction=0.25"]
TINY_TRAIN = ["train.batch_size=4", "train.log_every=1", "train.num_workers=0", "train.device=cpu",
              "train.progress=false"]
TINY_VQ = ["model.base_channels=8", "model.channel_mult=[1,2,2]", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
           "model.z_channels=8", "model.norm_groups=4", "model.codebook_size=32", "model.code_dim=4",
           "loss.perceptual=none", "loss.disc_channels=8", "loss.disc_layers=2", "monitor.grid_images=4"]
TINY_KL = ["model.spec=f4d4", "model.base_channels=8", "model.enc_res_blocks=1", "model.dec_res_blocks=1",
           "model.norm_groups=4", "loss.perceptual=none", "loss.disc_channels=8", "loss.disc_layers=2",
           "vf.enabled=false", "monitor.grid_images=4"]
AR_TRAIN = ["train.steps=6", "train.batch_size=8", "train.ckpt_every=2", "train.log_every=1", "train.num_workers=0",
            "train.device=cpu", "train.progress=false", "train.ema_decay=0.9", "val.batch_size=4",
            "sample.grid_at_checkpoint=0"]


def token_cache(folder: Path, n: int = 24, seed: int = 0, checksum: str = "abc") -> Path:
    """A tiny synthetic token cache, 3x3 tokens of 16 codes, 3 classes (no tokenizer run behind it)."""
    from twostage.data.cache_writer import write_arrays
    from twostage.data.token_cache import CacheMeta

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    plain = (labels[:, None] * 5 + np.arange(9)[None] + rng.integers(0, 2, (n, 9))) % 16
    meta = CacheMeta(kind="tokens", grid=(3, 3), num_classes=3, tokenizer_run="", tokenizer_checksum=checksum,
                     split="train", codebook_size=16, image_size=12)
    return write_arrays(folder, meta, np.stack([plain, plain[:, ::-1]], axis=1), labels)


def npz_splits(folder: Path, train: int, val: int) -> Path:
    """`folder` with train.npz / val.npz of random grayscale 16x16 images, 4 classes: the data of the
    tiny studies the tests run (an `npz` dataset root)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8),
                 labels=np.arange(n) % 4)
    return folder


def make_npz(folder: Path, n: int = 12, seed: int = 0) -> Path:
    """Random grayscale 16x16 images with 3 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = folder / "data.npz"
    np.savez(path, images=rng.integers(0, 256, size=(n, 16, 16), dtype=np.uint8), labels=np.arange(n) % 3)
    return path


def train_tokenizer(kind: str, data: Path, out: Path, steps: int = 2, extra: list[str] = ()) -> Path:
    """A tiny real tokenizer run (in this process), `kind` vq or kl."""
    from twostage import registry
    from twostage.tokenizers.run import train_run

    preset, tiny = {"vq": ("vq_fmnist_f4", TINY_VQ), "kl": ("kl_fmnist_f4d8", TINY_KL)}[kind]
    _, cfg = registry.load_config("tokenizer", preset, [*TINY_DATA, f"data.root={data}", *tiny, *TINY_TRAIN,
                                                        f"train.steps={steps}", f"train.ckpt_every={steps}", *extra])
    train_run(cfg, out)
    return out


def encode(run: Path, split: str, out: Path, **options) -> Path:
    from twostage.tokenizers.run import encode_run

    return encode_run(run, split, out, batch_size=8, device="cpu", **options)


# -- subprocesses with a fault --------------------------------------------------------------------------


def start(argv: list[str], fault: str | None = None, log: Path | None = None) -> subprocess.Popen:
    """`twostage ARGV` in a subprocess (this file as the script), with TWOSTAGE_FAULT=fault."""
    # one thread each: the reference and the victim run side by side on a small shared machine, and both
    # must use the same thread count (float reductions are only bit-identical for the same split)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TWOSTAGE_FAULT", None)
    if fault:
        env["TWOSTAGE_FAULT"] = fault
    out = open(log, "ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *map(str, argv)], env=env,
                                stdout=out, stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL)
    finally:
        if log is not None:
            out.close()


def run(argv: list[str], fault: str | None = None, log: Path | None = None, timeout: float = 300) -> int:
    """The exit status of `twostage ARGV` (-9 when the fault killed it)."""
    return start(argv, fault, log).wait(timeout)


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.is_file() else ""


# -- comparing checkpoints -------------------------------------------------------------------------------


def final_checkpoint(run_dir: Path) -> dict[str, object]:
    """Every file of the latest checkpoint: {"model.safetensors": {key: tensor}, ..., "state.json": {...}}."""
    from safetensors.torch import load_file

    from twostage.engine import checkpoint as ckpt

    path = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert path is not None, f"{run_dir} has no checkpoint"
    files: dict[str, object] = {"name": path.name}
    for f in sorted(path.iterdir()):
        files[f.name] = load_file(f) if f.suffix == ".safetensors" else json.loads(f.read_text())
    return files


def assert_bit_identical(a: Path, b: Path) -> int:
    """The latest checkpoints of two runs hold the same step, the same files and equal tensors, bit for
    bit (model, EMA, optimizer moments and scheduler / RNG / loader states). Returns the tensor count."""
    import torch

    ca, cb = final_checkpoint(a), final_checkpoint(b)
    assert ca.keys() == cb.keys() and ca["name"] == cb["name"]
    count = 0
    for name in ca:
        if name.endswith(".safetensors"):
            ta, tb = ca[name], cb[name]
            assert ta.keys() == tb.keys(), name
            for key in ta:
                assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), f"{name}: {key} differs"
                count += 1
        else:
            assert ca[name] == cb[name], f"{name} differs"
    return count


# -- the script: `twostage` with a fault armed ---------------------------------------------------------


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(fault: str) -> None:
    kind, *args = fault.split(":")
    if kind in ("after_checkpoint", "in_checkpoint"):
        from twostage.engine import checkpoint as ckpt

        target = int(args[0])
        real_save, real_file = ckpt.save_checkpoint, ckpt.save_file
        state = {"saving": None, "files": 0, "saved": False}

        def save_checkpoint(folder, step, *a, **k):
            state["saving"], state["files"] = step, 0
            path = real_save(folder, step, *a, **k)
            state["saving"] = None
            state["saved"] = state["saved"] or step == target
            return path

        def save_file(tensors, filename, *a, **k):
            result = real_file(tensors, filename, *a, **k)
            state["files"] += 1
            if kind == "in_checkpoint" and state["saving"] == target and state["files"] == int(args[1]):
                _kill()
            return result

        ckpt.save_checkpoint, ckpt.save_file = save_checkpoint, save_file
        if kind == "after_checkpoint":
            from twostage.data.loader import ResumableLoader

            real_next = ResumableLoader.__next__

            def next_batch(self):
                if state["saved"]:
                    _kill()
                return real_next(self)

            ResumableLoader.__next__ = next_batch
    elif kind == "in_encode":
        from twostage.data.cache_writer import CacheWriter

        real_add, calls = CacheWriter.add, [0]

        def add(self, *a, **k):
            real_add(self, *a, **k)
            calls[0] += 1
            if calls[0] == int(args[0]):
                _kill()

        CacheWriter.add = add
    else:
        raise SystemExit(f"unknown TWOSTAGE_FAULT {fault!r}")


if __name__ == "__main__":
    if os.environ.get("TWOSTAGE_FAULT"):
        _arm(os.environ["TWOSTAGE_FAULT"])
    from twostage import cli

    # Only the command group being run is registered: `twostage --help` imports every group (the study's
    # report pulls in matplotlib and scipy), a second per process that these tests do not need.
    group = {"tokenizer": "twostage.tokenizers.commands", "generator": "twostage.generators.commands"}
    if len(sys.argv) > 1 and sys.argv[1] in group:
        cli.COMMAND_MODULES = [group[sys.argv[1]]]
    sys.exit(cli.main(sys.argv[1:]))
