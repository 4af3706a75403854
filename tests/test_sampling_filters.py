"""Sampling math: the one CFG rule, top-k / top-p keep exactly the intended tokens, the draw,
balanced labels; CFG at scale 1 is conditional sampling; seeds reproduce runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twostage.config import ConfigError
from twostage.generators import guidance
from twostage.generators.ar.filters import filter_logits, guided_step, sample_logits, top_k_filter, top_p_filter
from twostage.generators.ar.model import AR_MODELS
from twostage.generators.ar.sampler import ARSampler
from twostage.generators.outputs import balanced_labels


def test_cfg_formula():
    cond, uncond = torch.randn(4, 9), torch.randn(4, 9)
    for s in (0.0, 1.0, 1.75, 2.0, 4.0):
        torch.testing.assert_close(guidance.combine(cond, uncond, s), uncond + s * (cond - uncond))
    assert torch.equal(guidance.combine(cond, uncond, 1.0), cond)  # exactly, not just closely
    assert torch.equal(guidance.combine(cond, uncond, 0.0), uncond)  # scale 0: exactly unconditional
    # guided_step reads the doubled batch as [conditional rows; unconditional rows]
    both = torch.cat([cond, uncond])
    got = guided_step(both, None, batch=4, cfg_scale=2.0, temperature=0)
    assert torch.equal(got, (uncond + 2.0 * (cond - uncond)).argmax(-1))
    assert torch.equal(guided_step(cond, None, batch=4, cfg_scale=2.0, temperature=0), cond.argmax(-1))  # not doubled


def test_the_one_guidance_rule():
    assert guidance.resolve_scale(None, 2.0) == 2.0 and guidance.resolve_scale(0, 2.0) == 0.0  # None: the run's
    assert guidance.resolve_scale(1, 2.0) == 1.0 and not guidance.active(1.0)
    assert guidance.active(0.0) and guidance.active(1.5)  # 0 is unconditional sampling: a doubled batch
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="CFG scale"):
            guidance.resolve_scale(bad, 1.0)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    ties = torch.zeros(1, 6)
    assert int(torch.isfinite(top_k_filter(ties, 3)).sum()) == 3  # exactly k even among ties
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 5), logits)
    assert torch.equal(top_k_filter(logits, 2)[kept], logits[kept])  # kept values untouched


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    def kept(p):
        return torch.isfinite(top_p_filter(logits, p))[0].tolist()
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(0.75) == [False, True, False, True]  # 0.5 + 0.3
    assert kept(0.9) == [False, True, True, True]  # + 0.15 (0.95 >= 0.9)
    assert kept(0.99) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the most likely token always stays
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_filters_compose_in_order_temperature_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = filter_logits(logits, temperature=2.0, top_k=3, top_p=1.0)
    assert torch.isfinite(out).sum() == 3 and torch.allclose(out[0, :3], logits[0, :3] / 2)
    # after top-k 3 and temperature 0.25 the first token holds > 0.98 of the mass: top-p 0.9 keeps it alone
    out = filter_logits(logits, temperature=0.25, top_k=3, top_p=0.9)
    assert torch.isfinite(out).tolist() == [[True, False, False, False, False]]


def test_gumbel_max_draw_follows_the_softmax():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20000, 4)
    noise = torch.empty(20000, 4).exponential_(generator=gen)
    freq = torch.bincount(sample_logits(logits, noise), minlength=4).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    masked = top_k_filter(logits, 1)
    assert (sample_logits(masked, noise) == 3).all()  # filtered tokens are never drawn


def test_balanced_labels():
    labels = balanced_labels(50, 10)
    assert np.bincount(labels).tolist() == [5] * 10 and list(labels) == sorted(labels)
    assert np.bincount(balanced_labels(23, 10)).tolist() == [3, 3, 3] + [2] * 7


def _model(seed=0):
    torch.manual_seed(seed)
    model = AR_MODELS["tiny"](vocab_size=50, num_classes=4, grid=(4, 4), ffn_multiple_of=32, token_dropout=0.0,
                              resid_dropout=0.0, ffn_dropout=0.0).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def test_cfg_scale_one_equals_conditional_sampling():
    # A model trained with label dropout 0 never saw the null class; scale 1 must then reproduce plain
    # conditional sampling exactly (same seed => same tokens), without computing the unconditional half.
    model = _model()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    cond = ARSampler(model, batch_size=3, top_k=20, top_p=0.95)  # the default scale: 1, no guidance
    plain = ARSampler(model, batch_size=3, cfg_scale=1.0, top_k=20, top_p=0.95)
    guided = ARSampler(model, batch_size=3, cfg_scale=3.0, top_k=20, top_p=0.95)
    assert cond.rows == plain.rows == 3 and guided.rows == 6  # only a guiding scale doubles the batch
    a = cond.sample(labels, seed=11)
    assert torch.equal(a, plain.sample(labels, seed=11))
    # guidance until step 0 (no step guided) is conditional sampling too, through the doubled batch
    until0 = ARSampler(model, batch_size=3, cfg_scale=3.0, cfg_until=0, top_k=20, top_p=0.95)
    assert until0.rows == 6 and torch.equal(a, until0.sample(labels, seed=11))
    assert not torch.equal(a, guided.sample(labels, seed=11))  # guidance does change the samples


def test_seeded_sampling_is_reproducible_and_independent_of_how_calls_are_split():
    model = _model(1)
    labels = torch.as_tensor(balanced_labels(8, 4))
    sampler = ARSampler(model, batch_size=4, cfg_scale=2.0, cfg_until=5)
    whole = sampler.sample(labels, seed=5)
    assert torch.equal(whole, sampler.sample(labels, seed=5))
    parts = torch.cat([sampler.sample(labels[:4], seed=5), sampler.sample(labels[4:], seed=5, first_batch=1)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, sampler.sample(labels, seed=6))
    greedy = ARSampler(model, batch_size=4, cfg_scale=2.0, temperature=0.0)
    assert torch.equal(greedy.sample(labels, seed=0), greedy.sample(labels, seed=1))  # no noise when greedy
