"""Quantizer: nearest-code search, straight-through gradients, usage and perplexity."""

import math

import torch
import torch.nn.functional as F

from twostage.tokenizers.vq.config import VQConfig
from twostage.tokenizers.vq.model import VQModel
from twostage.tokenizers.vq.quantizer import (
    CodebookUsage,
    VectorQuantizer,
    codebook_usage,
    perplexity,
)


def _brute_force(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    # explicit pairwise distances, one row at a time
    return torch.stack([((codes - row) ** 2).sum(-1).argmin() for row in z])


def test_nearest_code_matches_brute_force_l2_normalized():
    torch.manual_seed(0)
    q = VectorQuantizer(257, 8, l2_norm=True)
    z = torch.randn(300, 8)
    got = q.nearest(z, chunk=64)  # several chunks
    want = _brute_force(F.normalize(z, dim=-1), F.normalize(q.embedding.weight, dim=-1))
    assert torch.equal(got, want)


def test_nearest_code_matches_brute_force_raw():
    torch.manual_seed(1)
    q = VectorQuantizer(100, 4, l2_norm=False)
    with torch.no_grad():
        q.embedding.weight.normal_()
    z = torch.randn(200, 4) * 2
    assert torch.equal(q.nearest(z), _brute_force(z, q.embedding.weight))


def test_forward_returns_codes_and_losses():
    torch.manual_seed(2)
    q = VectorQuantizer(64, 8, l2_norm=True, commit_weight=0.25)
    z = torch.randn(2, 8, 3, 5)
    out = q(z)
    assert out.indices.shape == (2, 3, 5)
    codes = F.normalize(q.embedding.weight, dim=-1)[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.z_q, codes)  # forward value is the code
    zn = F.normalize(z, dim=1)
    torch.testing.assert_close(out.codebook_loss, F.mse_loss(codes, zn))
    torch.testing.assert_close(out.commit_loss, 0.25 * F.mse_loss(zn, codes))
    assert float(out.entropy_loss) == 0.0


def test_entropy_loss_is_finite_and_differentiable():
    q = VectorQuantizer(32, 4, entropy_weight=0.1)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = q(z)
    assert torch.isfinite(out.entropy_loss)
    out.entropy_loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_straight_through_gradients_reach_the_encoder():
    torch.manual_seed(3)
    cfg = VQConfig(base_channels=8, channel_mult=(1, 2), enc_res_blocks=1, dec_res_blocks=1, z_channels=8,
                   norm_groups=4, codebook_size=16, code_dim=4)
    model = VQModel(cfg)
    out = model(torch.randn(2, 3, 8, 8))
    out.recon.square().mean().backward()  # reconstruction only: no VQ loss terms
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    # the codebook itself gets no gradient from the reconstruction (only from the codebook loss)
    assert model.quantizer.embedding.weight.grad is None or model.quantizer.embedding.weight.grad.abs().sum() == 0


def test_usage_and_perplexity_on_known_index_sets():
    idx = torch.tensor([0, 1, 2, 3] * 5)
    assert float(codebook_usage(idx, 8)) == 0.5
    assert math.isclose(float(perplexity(idx, 8)), 4.0, rel_tol=1e-5)
    assert math.isclose(float(perplexity(torch.zeros(10, dtype=torch.long), 8)), 1.0, rel_tol=1e-5)
    # two codes used 3:1 -> exp(H) with H = -(.75 ln .75 + .25 ln .25)
    idx = torch.tensor([5, 5, 5, 6])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert math.isclose(float(perplexity(idx, 8)), math.exp(h), rel_tol=1e-5)
    assert float(codebook_usage(torch.arange(16), 16)) == 1.0


def test_usage_window_forgets_old_codes_and_round_trips():
    tracker = CodebookUsage(10, window=3)
    stats = tracker.update(torch.tensor([[0, 1], [1, 1]]), step=0)
    assert math.isclose(float(stats["usage"]), 0.2, rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(float(stats["batch_usage"]), 0.2, rel_tol=1e-6, abs_tol=1e-7)
    tracker.update(torch.tensor([2, 3, 4]), step=2)
    assert math.isclose(float(tracker.usage(2)), 0.5, rel_tol=1e-6)  # steps 0..2 are inside the window
    assert math.isclose(float(tracker.usage(3)), 0.3, rel_tol=1e-6)  # step 0 has left it
    assert math.isclose(float(tracker.usage(10)), 0.0, rel_tol=1e-6, abs_tol=1e-7)
    restored = CodebookUsage(10, window=3)
    restored.load_state_dict(tracker.state_dict())
    assert math.isclose(float(restored.usage(3)), 0.3, rel_tol=1e-6, abs_tol=1e-7)
    torch.testing.assert_close(restored.hist, tracker.hist)
