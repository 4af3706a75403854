"""CRT regularizer: causality, gradient into the encoder, weight ramp, options."""

import pytest
import torch

from twostage.tokenizers.vq.config import VQConfig
from twostage.tokenizers.vq.crt import CausalPredictor, crt_loss, crt_weight
from twostage.tokenizers.vq.model import VQModel


def predictor(positions="learned", grid=(4, 5), code_dim=6):
    torch.manual_seed(0)
    return CausalPredictor(code_dim, grid, width=32, layers=2, heads=4, positions=positions).eval()


@pytest.mark.parametrize("positions", ["learned", "rope2d"])
def test_predictor_is_causal(positions):
    g = predictor(positions)
    z = torch.randn(2, 6, 4, 5)
    out = g(z)
    assert out.shape == (2, 20, 6)
    for i in (0, 7, 18):
        # change every latent from raster position i on: outputs 0..i only see z_1..z_i (1-based),
        # i.e. raster positions < i, so they must not move
        z2 = z.clone().flatten(2)
        z2[:, :, i:] = torch.randn_like(z2[:, :, i:])
        out2 = g(z2.view_as(z))
        torch.testing.assert_close(out2[:, : i + 1], out[:, : i + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out2[:, i + 1 :], out[:, i + 1 :])


def test_start_token_predicts_the_first_latent_independently_of_the_input():
    g = predictor()
    a, b = g(torch.randn(1, 6, 4, 5)), g(torch.randn(1, 6, 4, 5))
    torch.testing.assert_close(a[:, 0], b[:, 0])


def test_crt_loss_sends_gradient_into_the_encoder():
    torch.manual_seed(1)
    model = VQModel(VQConfig(base_channels=8, channel_mult=(1, 2, 2), enc_res_blocks=1, dec_res_blocks=1,
                             z_channels=8, norm_groups=4, codebook_size=16, code_dim=6))
    g = CausalPredictor(6, model.grid_size(16), width=32, layers=2, heads=4)
    latent = model.encode_latent(torch.randn(2, 3, 16, 16))
    loss = crt_loss(g, latent)
    loss.backward()
    for p in (model.encoder.conv_in.weight, model.quant_conv.weight, g.start, g.blocks[0].qkv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad is None  # the decoder is not involved


def test_crt_loss_value_and_options():
    g = predictor()
    z = torch.randn(3, 6, 4, 5, requires_grad=True)
    zn = torch.nn.functional.normalize(z, dim=1)
    want = (g(zn) - zn.flatten(2).transpose(1, 2)).pow(2).sum(-1).mean()
    torch.testing.assert_close(crt_loss(g, z), want)
    raw = crt_loss(g, z, normalize=False)
    torch.testing.assert_close(raw, (g(z) - z.flatten(2).transpose(1, 2)).pow(2).sum(-1).mean())
    # stop-gradient on the target: the last latent is only ever a target, so it gets no gradient
    z.grad = None
    crt_loss(g, z, stop_grad_target=True).backward()
    assert z.grad[:, :, -1, -1].abs().sum() == 0
    assert z.grad[:, :, 0, 0].abs().sum() > 0
    z.grad = None
    crt_loss(g, z).backward()
    assert z.grad[:, :, -1, -1].abs().sum() > 0


def test_weight_ramp():
    assert crt_weight(0, 4.0, 1000) == 0.0
    assert crt_weight(250, 4.0, 1000) == 1.0
    assert crt_weight(500, 4.0, 1000) == 2.0
    assert crt_weight(1000, 4.0, 1000) == 4.0
    assert crt_weight(50_000, 4.0, 1000) == 4.0
    assert crt_weight(0, 4.0, 0) == 4.0


def test_grid_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="grid"):
        predictor()(torch.randn(1, 6, 5, 5))


def test_class_conditional_start_token():
    torch.manual_seed(0)
    g = CausalPredictor(6, (2, 3), width=32, layers=2, heads=4, num_classes=5).eval()
    z = torch.randn(2, 6, 2, 3)
    a = g(z, torch.tensor([0, 0]))
    b = g(z, torch.tensor([0, 3]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1, 0], b[1, 0])  # the start prediction depends on the class
    loss = crt_loss(g, z, labels=torch.tensor([1, 2]))
    loss.backward()
    assert g.class_emb.weight.grad[1:3].abs().sum() > 0 and g.class_emb.weight.grad[0].abs().sum() == 0
    with pytest.raises(ValueError, match="labels"):
        g(z)
