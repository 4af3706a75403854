"""Published checkpoints of other projects as twostage run folders: `convert(format, src, out)`.

    import twostage.convert as tc
    tc.convert("llamagen-vq", "vq_ds16_c2i.pt", "runs/llamagen_vq16", ["data.name=folder", "data.root=/data/imagenet"])
    tok = twostage.load_tokenizer("runs/llamagen_vq16")

A converted checkpoint is an ordinary run folder (config.yaml and checkpoints/step_0000000/, written by
twostage/convert/run_folder.py), so every command that reads a run (`tokenizer encode`, `eval recon`,
the API's loaders) works on it unchanged. The checkpoint's state records where the weights came from
({"converted_from": ...}). Each format is one module holding its key mapping; `FORMATS` lists them with
where their published weights are downloaded (`twostage convert --help` prints the table).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from twostage.common.errors import UserError
from twostage.config import ConfigError, parse_overrides


class ConversionError(UserError):
    """A file that is not a checkpoint of the format asked for, or that the format cannot hold."""


@dataclass(frozen=True)
class Format:
    name: str
    converter: str  # "module:function", imported on use: (src, overrides) -> run_folder.Converted
    summary: str  # one line for `--help`
    download: str  # where the published checkpoints are
    sections: tuple[str, ...] = ("data",)  # config sections a user may set (the rest comes from the weights)

    def converter_fn(self) -> Callable:
        module, _, attr = self.converter.partition(":")
        return getattr(importlib.import_module(module), attr)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(name="llamagen-vq", converter="twostage.convert.llamagen_vq:convert_llamagen_vq",
               summary="LlamaGen VQ-16 / VQ-8 image tokenizers (codebook 16384, code dim 8, l2-normalized codes) "
                       "-> a vq tokenizer run",
               download="https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds16_c2i.pt (VQ-16), "
                        "https://huggingface.co/FoundationVision/LlamaGen/resolve/main/vq_ds8_c2i.pt (VQ-8)"),
    )
}


def find_format(name: str) -> Format:
    """The format called `name`; an unknown name is a ConfigError naming the closest one and the list."""
    if name in FORMATS:
        return FORMATS[name]
    close = difflib.get_close_matches(name, list(FORMATS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"format {name!r} is not known{hint} Formats: {', '.join(FORMATS)}")


def check_overrides(fmt: Format, overrides: Sequence[str]) -> None:
    """Only the sections a format leaves to the user (data: what `encode` / `eval recon` read) may be set:
    the model section is read off the weights and must describe them exactly."""
    bad = [k for k in parse_overrides(list(overrides)) if k not in fmt.sections]
    if bad:
        raise ConfigError(f"convert {fmt.name} takes overrides of {', '.join(fmt.sections)}.* only "
                          f"(got {', '.join(bad)}.*): the model section is read from the checkpoint")


def convert(format: str, src: str | Path, out: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Convert the published checkpoint `src` of `format` into the new run folder `out`; returns `out`."""
    from twostage.common.hashing import file_sha256
    from twostage.convert.run_folder import check_out, write_run

    fmt = find_format(format)
    check_overrides(fmt, overrides)
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src} is not a file (download it first: {fmt.download})")
    check_out(out)
    converted = fmt.converter_fn()(src, list(overrides))
    converted.converted_from = {"format": fmt.name, "file": str(src.resolve()), "sha256": file_sha256(src),
                                **converted.converted_from}
    return write_run(out, converted)


__all__ = ["ConversionError", "Format", "FORMATS", "find_format", "check_overrides", "convert"]
