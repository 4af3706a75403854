"""The unigram entropy of a token cache: what a context-free model's loss would be (nats per token)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from twostage.data.cache_writer import write_arrays
from twostage.data.token_cache import CacheMeta, unigram_entropy


def cache(folder, plain, flipped, kind="tokens"):
    meta = CacheMeta(kind=kind, grid=(2, 2), num_classes=2, tokenizer_run="", tokenizer_checksum="e" * 64,
                     split="val", codebook_size=16 if kind == "tokens" else None, image_size=8)
    return write_arrays(folder, meta, np.stack([plain, flipped], axis=1), np.arange(len(plain)) % 2)


def test_entropy_of_known_code_distributions(tmp_path):
    one = np.zeros((6, 4), dtype=np.int64)
    assert unigram_entropy(cache(tmp_path / "one", one, one + 5)) == 0.0  # the flipped variants do not count
    four = np.tile(np.arange(4), (6, 1))
    assert unigram_entropy(cache(tmp_path / "four", four, one)) == pytest.approx(math.log(4))
    skew = np.array([[0, 0, 0, 1]] * 5)  # p = (3/4, 1/4)
    assert unigram_entropy(cache(tmp_path / "skew", skew, skew)) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_a_latents_cache_has_no_code_entropy(tmp_path):
    lat = np.zeros((4, 3, 2, 2), dtype=np.float32)
    assert unigram_entropy(cache(tmp_path / "lat", lat, lat, kind="latents")) is None
