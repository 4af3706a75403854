"""The protocol record attached to every metric result, and metric names derived from the network.

A number without its protocol is not comparable (docs/methods.md §8 "Protocol record"; sample-count bias: §9): FID-50k vs FID-10k, random vs
balanced labels, 250 vs 50 sampler steps, bf16 vs fp32 features, reconstructions against the
validation set vs against the generation reference batch all move the number. So every result
carries a `Protocol`, and metric names say which network produced them: only Inception-v3 features
give "FID"/"sFID"/"IS"/"FIDinf"/"KID"; EfficientNet-Lite0 gives "FD-EffNetLite0", "sFD-EffNetLite0",
"IS-EffNetLite0", "FDinf-EffNetLite0", "KID-EffNetLite0", ... Companion values append a suffix to
the name: "_std", "_stderr", "_low" / "_high" (an interval).
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from twostage.common.atomic import write_text_atomic
import twostage
from twostage.common.device import device_name

__all__ = ["Protocol", "metric_name", "device_description", "write_result"]

INCEPTION = "InceptionV3"
# metric kind -> (name with Inception-v3, prefix for other networks)
_NAMES = {
    "fd": ("FID", "FD"),
    "sfd": ("sFID", "sFD"),
    "is": ("IS", "IS"),
    "rfd": ("rFID", "rFD"),
    "precision": ("Precision", "Precision"),
    "recall": ("Recall", "Recall"),
    "fdinf": ("FIDinf", "FDinf"),  # FD extrapolated to N = inf (Chong & Forsyth's FID_inf)
    "kid": ("KID", "KID"),
}


def metric_name(kind: str, network: str) -> str:
    """metric_name("fd", "InceptionV3") -> "FID"; metric_name("fd", "EffNetLite0") -> "FD-EffNetLite0"."""
    try:
        inception_name, prefix = _NAMES[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown metric kind {kind!r}; one of {sorted(_NAMES)}") from None
    return inception_name if network == INCEPTION else f"{prefix}-{network}"


def device_description(device: str | torch.device | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return f"cuda:{device_name(device)}"
    return f"cpu:{device_name(device)} ({torch.get_num_threads()} threads)"


@dataclass
class Protocol:
    """Everything a metric number depends on besides the model. Unknown fields stay None (and say
    so in the JSON) rather than being guessed."""

    num_samples: int | None = None
    label_sampling: str | None = "balanced"  # "balanced" (equal count per class), "random", "none"
    sampler: str | None = None  # e.g. "ar-topk-all", "euler", "reconstruction"
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: list[float] | None = None
    precision: str = "fp32"  # of the feature extraction (and of sampling, when known)
    feature_network: str | None = None
    feature_checksum: str | None = None
    feature_input_size: int | None = None
    feature_preprocessing: str | None = None
    reference: str | None = None  # e.g. "fashion-mnist:test@32px/pad/rgb (10000 images)"
    reference_stats: str | None = None  # path of the cached statistics used
    seed: int | None = None
    package_version: str = twostage.__version__
    quantization: str | None = "uint8"  # images rounded to 8 bits before feature extraction
    device: str | None = None
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    def with_network(self, net) -> Protocol:
        for k, v in net.protocol().items():
            setattr(self, k, v)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_result(path: str | Path, metrics: dict[str, float], protocol: Protocol | dict,
                 command: str | None = None) -> Path:
    """Write {"metrics", "protocol", "command"} as JSON (atomic replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = protocol.to_dict() if isinstance(protocol, Protocol) else dict(protocol)
    doc = {"metrics": metrics, "protocol": proto}
    if command:
        doc["command"] = command
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path
