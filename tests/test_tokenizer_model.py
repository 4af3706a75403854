"""VQ autoencoder shapes over f = 2/4/8/16, index round trips and the published size."""

import pytest
import torch

from twostage.tokenizers.vq.config import VQConfig
from twostage.tokenizers.vq.model import VQModel

MULTS = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 4), 16: (1, 1, 2, 2, 4)}


def tiny(mult, **kw) -> VQConfig:
    base = dict(base_channels=8, channel_mult=mult, enc_res_blocks=1, dec_res_blocks=1, z_channels=8,
                norm_groups=4, codebook_size=32, code_dim=4)
    return VQConfig(**(base | kw))


@pytest.mark.parametrize("f", [2, 4, 8, 16])
def test_shapes_per_downsampling_factor(f):
    torch.manual_seed(0)
    model = VQModel(tiny(MULTS[f])).eval()
    assert model.downsample_factor == f
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    h = 32 // f
    assert model.grid_size(32) == (h, h)
    assert out.recon.shape == x.shape
    assert out.latent.shape == (2, 4, h, h)
    assert out.quant.indices.shape == (2, h, h)
    assert out.quant.indices.dtype == torch.int64
    assert int(out.quant.indices.max()) < 32
    # decoding the indices gives exactly the forward reconstruction
    torch.testing.assert_close(model.decode_indices(out.quant.indices), out.recon)


def test_non_square_and_grayscale():
    model = VQModel(tiny((1, 2, 2), in_channels=1, out_channels=1)).eval()
    out = model(torch.zeros(1, 1, 16, 24))
    assert out.recon.shape == (1, 1, 16, 24) and out.quant.indices.shape == (1, 4, 6)
    with pytest.raises(ValueError, match="divisible"):
        model.grid_size(30)


def test_channels_last_matches_contiguous():
    torch.manual_seed(1)
    model = VQModel(tiny((1, 2, 2))).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x).recon
    model.to(memory_format=torch.channels_last)
    model.channels_last_codes = True  # as the training task sets it for an NHWC model
    out = model(x.contiguous(memory_format=torch.channels_last)).recon
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_k_seeds_stacked_under_vmap_equal_k_separate_models():
    """K tokenizer seeds as one stacked model (twostage/engine/replicas.py StackedModule, torch.func.vmap):
    the same reconstructions, quantizer losses and gradients as the K models run one by one (float64:
    equal up to rounding). VQModel.forward must not query the input's layout, which vmap cannot answer."""
    from torch.func import functional_call, vmap

    from twostage.engine.replicas import StackedModule

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(VQModel(tiny((1, 2, 2))).double().train())
    stacked = StackedModule([VQModel(tiny((1, 2, 2))).double().train() for _ in models])
    with torch.no_grad():  # the stacked weights start as the two seeded models' weights
        for w, name in zip(stacked.weights, stacked.names):
            w.copy_(torch.stack([m.get_parameter(name) for m in models]))
    x = torch.randn(2, 3, 3, 16, 16, dtype=torch.float64)

    def loss(weights, images):
        out = functional_call(stacked.base, weights, (images,))
        return (out.recon - images).square().mean() + out.quant.loss, out.recon

    values, recons = vmap(loss)(stacked.stacked(), x)
    values.sum().backward()
    for k, model in enumerate(models):
        value, recon = loss(dict(model.named_parameters()), x[k])
        value.backward()
        torch.testing.assert_close(values[k], value)
        torch.testing.assert_close(recons[k], recon)
        for w, name in zip(stacked.weights, stacked.names):
            torch.testing.assert_close(w.grad[k], model.get_parameter(name).grad, rtol=1e-9, atol=1e-12)


def test_published_vq16_size_is_about_72m_parameters():
    # Build on the meta device: no memory, no init time.
    with torch.device("meta"):
        model = VQModel(VQConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 70e6 < n < 74e6
    assert model.downsample_factor == 16 and model.grid_size(256) == (16, 16)


def test_optimizer_state_of_a_channels_last_model_takes_its_strides_back_after_a_checkpoint(tmp_path):
    # a checkpoint stores Adam's moments contiguous; the compiled CUDA tokenizer's parameters are channels_last,
    # and the fused CUDA Adam refuses moments of other strides at the first step after a resume
    from twostage.engine import checkpoint as ckpt
    from twostage.engine.optim import match_state_layout_

    torch.manual_seed(0)
    model = VQModel(tiny((1, 2, 2))).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)).recon.square().mean().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 1, ckpt.module_tensors({"m": model}), {"opt": opt.state_dict()})
    _, _, state, _ = ckpt.load_checkpoint(path)
    resumed = torch.optim.Adam(model.parameters(), lr=1e-3)
    resumed.load_state_dict(state["opt"])
    conv = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert resumed.state[conv]["exp_avg"].stride() != conv.stride()  # what load_state_dict leaves
    match_state_layout_(resumed)
    assert len(resumed.state) > 10
    for p in resumed.state:
        for key in ("exp_avg", "exp_avg_sq"):
            assert resumed.state[p][key].stride() == p.stride()
            torch.testing.assert_close(resumed.state[p][key], opt.state[p][key], rtol=0, atol=0)
