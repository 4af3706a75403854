"""AR transformer: cached decoding equals the full forward pass, causality, published sizes."""

from __future__ import annotations

import pytest
import torch

from twostage.generators.ar.model import AR_MODELS, ARTransformer
from twostage.generators.ar.sampler import ARSampler
from twostage.generators.ar.config import ARModelConfig


def tiny(grid=(3, 4), vocab=37, classes=5, seed=0) -> ARTransformer:
    torch.manual_seed(seed)
    model = AR_MODELS["tiny"](vocab_size=vocab, num_classes=classes, grid=grid, ffn_multiple_of=32).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the zero-initialized head would make every logit 0
    return model


@pytest.mark.parametrize("bucket", [0, 1, 4, 5])
def test_cached_decoding_gives_the_full_forward_logits_at_every_step(bucket):
    from twostage.generators.ar.kv_cache import bucket_length

    model = tiny()
    tokens = torch.randint(0, model.vocab_size, (3, model.num_tokens))
    labels = torch.tensor([0, 4, model.null_class])
    with torch.no_grad():
        full = model(tokens, labels)
        model.setup_caches(3)
        positions = torch.arange(model.seq_len)
        steps = [model.prefill(labels)]
        for t in range(1, model.num_tokens):
            kv = positions[: bucket_length(t + 1, bucket, model.seq_len)]
            steps.append(model.decode(tokens[:, t - 1], positions[t], kv))
        model.clear_caches()
    cached = torch.stack(steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_sampler_draws_each_token_from_the_full_forward_logits():
    model = tiny(grid=(4, 4))
    labels = torch.tensor([1, 2, 3, 0, 4])
    sampler = ARSampler(model, batch_size=2, cfg_scale=3.0, kv_bucket=3, top_k=10)  # 3 batches, last padded
    tokens, logits = sampler.sample(labels, seed=3, return_logits=True)
    assert tokens.shape == (5, 4, 4) and model.blocks[0].attn.kv_cache is None  # eager sampler frees the cache
    with torch.no_grad():
        full = model(tokens.flatten(1), labels)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


def test_the_model_is_causal():
    model = tiny(grid=(3, 3))
    tokens = torch.randint(0, model.vocab_size, (2, 9))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        base = model(tokens, labels)
        for j in range(9):
            changed = tokens.clone()
            changed[:, j] = (changed[:, j] + 1) % model.vocab_size
            out = model(changed, labels)
            # logits at position i predict z_i from [class, z_0..z_{i-1}]: z_j reaches only i > j
            torch.testing.assert_close(out[:, : j + 1], base[:, : j + 1], rtol=0, atol=0)
            if j < 8:
                assert not torch.allclose(out[:, j + 1], base[:, j + 1])
        other = model(tokens, torch.tensor([3, 2]))
    assert not torch.allclose(other[0, 0], base[0, 0]) and torch.equal(other[1], base[1])


def test_zero_head_starts_at_the_uniform_loss_and_per_token_loss_matches_cross_entropy():
    torch.manual_seed(0)
    model = AR_MODELS["tiny"](vocab_size=64, num_classes=3, grid=(2, 2), ffn_multiple_of=32)
    tokens, labels = torch.randint(0, 64, (4, 4)), torch.randint(0, 3, (4,))
    ce = model(tokens, labels, per_token_loss=True)
    assert ce.shape == (4, 4) and torch.allclose(ce, torch.full_like(ce, torch.log(torch.tensor(64.0)).item()))
    model = tiny()
    tokens, labels = torch.randint(0, 37, (2, 12)), torch.tensor([0, 1])
    logits = model(tokens, labels)
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    torch.testing.assert_close(model(tokens, labels, per_token_loss=True), expected)


def test_published_sizes_and_flops():
    counts = {}
    for name, millions in {"B": 111, "L": 343, "XL": 775, "XXL": 1411, "3B": 3097}.items():
        with torch.device("meta"):
            model = AR_MODELS[name](vocab_size=16384, num_classes=1000, grid=(16, 16))
        counts[name] = model.param_counts()
        assert round(counts[name]["total"] / 1e6) == millions, name
    layers, width, _ = ARModelConfig(size="B").shape
    norms = width * (2 * layers + 1)  # RMSNorm gains: parameters without matmuls
    n = counts["B"]["non_embedding"] - norms  # the matmul weights (N of 6 N D), output head included
    with torch.device("meta"):
        b = AR_MODELS["B"](vocab_size=16384, num_classes=1000, grid=(16, 16))
    assert b.flops_per_token()["train"] == 6 * n + 12 * layers * width * 256


def test_bf16_weights_keep_fp32_rope_tables():
    model = tiny().to(torch.bfloat16)
    assert model.rope_cos.dtype == torch.float32 and model.head.weight.dtype == torch.bfloat16
    ref = tiny()
    torch.testing.assert_close(model.rope_sin, ref.rope_sin, rtol=0, atol=0)
    assert not any(k.startswith("rope") or "kv_cache" in k for k in model.state_dict())
