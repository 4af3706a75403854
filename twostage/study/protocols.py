"""Evaluation protocols in the results table: which fields decide whether two numbers can be compared.

    protocol_summary(records)      key -> {value: count} over the rows' JSON protocol strings
    comparability_key(record)      the fields that must agree before two gFDs are compared
    rfd_name(rows, gfd_name)       the reconstruction metric's name ("rFD-EffNetLite0", "rFID")

docs/methods.md §8 "Protocol record": a gFD from another sample count, feature network, reference or
quantization is another metric; the report compares numbers only within one protocol.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from twostage.config import flatten

__all__ = ["COMPARABILITY", "SAMPLING", "protocol_summary", "comparability_key", "rfd_name", "plain"]

# Protocol fields that must agree for numbers to be comparable (docs/methods.md §8 "Protocol record").
COMPARABILITY = ("num_samples", "label_sampling", "feature_network", "feature_checksum", "feature_input_size",
                 "feature_preprocessing", "reference", "reference_stats", "quantization")
SAMPLING = ("sampler", "steps", "cfg_scale", "cfg_interval", "temperature", "top_k", "top_p", "precision")


def _parse(record: Any) -> dict[str, Any]:
    if not record:
        return {}
    try:
        return flatten(json.loads(record) if isinstance(record, str) else record)
    except json.JSONDecodeError:
        return {"unparsed": record}


def protocol_summary(records: Iterable[Any]) -> dict[str, dict[str, int]]:
    """key -> {value as JSON: count} over the given JSON protocol strings (nested keys dotted)."""
    out: dict[str, dict[str, int]] = {}
    for rec in records:
        for k, v in _parse(rec).items():
            value = json.dumps(v, sort_keys=True)
            out.setdefault(k, {})
            out[k][value] = out[k].get(value, 0) + 1
    # The fields that decide comparability first, then how samples were drawn, then the rest.
    rank = lambda k: (0 if k.split(".")[-1] in COMPARABILITY else 1 if k.split(".")[-1] in SAMPLING else 2, k)
    return {k: dict(sorted(out[k].items())) for k in sorted(out, key=rank)}


def comparability_key(record: Any) -> str:
    """The comparability fields of one protocol as a canonical JSON string ("{}" when not recorded)."""
    flat = _parse(record)
    return json.dumps({k: v for k, v in sorted(flat.items()) if k.split(".")[-1] in COMPARABILITY}, sort_keys=True)


def plain(value_json: str) -> str:
    """A protocol value for reading: strings without their JSON quotes, anything else as JSON."""
    v = json.loads(value_json)
    return v if isinstance(v, str) else value_json


def rfd_name(rows: Iterable[Mapping[str, Any]], gfd_name: str) -> str:
    """The reconstruction metric's name. From the recon protocol's network when recorded (same rule as
    twostage.metrics.protocol.metric_name, restated so the report does not import torch), else by
    prefixing the generation metric's name."""
    nets = {_parse(r.get("recon_protocol")).get("feature_network") for r in rows}
    nets.discard(None)
    if len(nets) == 1:
        net = nets.pop()
        return "rFID" if net == "InceptionV3" else f"rFD-{net}"
    return "r" + gfd_name
