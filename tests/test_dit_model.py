"""LightningDiT network (twostage/generators/dit/model.py): shapes, AdaLN-Zero init, RoPE, sizes."""

import pytest
import torch

from twostage import config as configlib
from twostage.generators.dit.config import DiTModelConfig, DiTRunConfig
from twostage.generators.dit.model import DIT_MODELS, LightningDiT, build_dit, ffn_hidden
from twostage.nn.rope import apply_rope, rope_2d_tables


def tiny(**kw):
    torch.manual_seed(0)
    return build_dit("tiny", in_channels=6, grid=(4, 4), num_classes=3, **kw)


@pytest.mark.parametrize("patch", [1, 2])
def test_shapes_and_zero_init(patch):
    model = tiny(patch_size=patch)
    x = torch.randn(5, 6, 4, 4)
    t, y = torch.rand(5), torch.tensor([0, 1, 2, 3, 3])  # 3 = null class
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # AdaLN-Zero: every block and the head start at 0
    assert model.patchify(x).shape == (5, 16 // patch**2, 6 * patch**2)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    with pytest.raises(ValueError, match="expected latents"):
        model(torch.randn(2, 5, 4, 4), t[:2], y[:2])


def test_gradients_reach_every_parameter_once_perturbed():
    model = tiny(qk_norm=True)
    with torch.no_grad():  # leave the zero init, so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 6, 4, 4)
    out = model(x, torch.rand(3), torch.tensor([0, 1, 3]))
    out.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    # conditioning matters: other labels or times give other velocities
    with torch.no_grad():
        a = model(x, torch.full((3,), 0.2), torch.tensor([0, 0, 0]))
        b = model(x, torch.full((3,), 0.2), torch.tensor([1, 1, 1]))
        c = model(x, torch.full((3,), 0.8), torch.tensor([0, 0, 0]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_rope_is_relative_and_options():
    cos, sin = rope_2d_tables((3, 5), 8)  # the shared 2D RoPE, without a prefix as the DiT uses it
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        qi, kj = apply_rope(q.expand(1, 15, 8), cos, sin)[0, i], apply_rope(k.expand(1, 15, 8), cos, sin)[0, j]
        return float(qi @ kj)

    # grid (3, 5): index = row * 5 + col; same offset (+1 row, +2 cols) gives the same score
    assert score(0, 7) == pytest.approx(score(5, 12), abs=1e-5)
    assert score(0, 7) != pytest.approx(score(0, 8), abs=1e-3)
    assert torch.allclose(apply_rope(q.expand(1, 15, 8), cos, sin).norm(dim=-1), q.norm().expand(1, 15), atol=1e-5)
    # (N, T, heads, D) and (N, T, 2, heads, D) broadcast the same tables, as the model's (T, 1, 1, D) buffers
    x = torch.randn(2, 15, 2, 3, 8)
    c4, s4 = cos[:, None, None], sin[:, None, None]
    assert torch.allclose(apply_rope(x, c4, s4)[:, :, 1], apply_rope(x[:, :, 1], cos[:, None], sin[:, None]))
    model = tiny()
    assert torch.equal(model.rope_cos, rope_2d_tables((4, 4), 16)[0][:, None, None])  # tiny: width 64, 4 heads
    plain = tiny(rope=False, abs_pos=False)
    assert plain.pos is None and not hasattr(plain, "rope_cos")
    assert plain(torch.randn(2, 6, 4, 4), torch.rand(2), torch.tensor([0, 1])).shape == (2, 6, 4, 4)


def test_named_sizes():
    assert ffn_hidden(768, 4.0) == 2048 and ffn_hidden(1152, 4.0) == 3072
    assert {"tiny", "B", "L", "XL"} <= set(DIT_MODELS)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        xl = DIT_MODELS["XL"](in_channels=32, grid=(16, 16), num_classes=1000, patch_size=1)
        b = DIT_MODELS["B"](in_channels=32, grid=(16, 16), num_classes=1000)
    assert len(xl.blocks) == 28 and xl.width == 1152 and len(b.blocks) == 12 and b.width == 768
    counts = xl.param_counts()
    assert abs(counts["non_embedding"] / 675e6 - 1) < 0.03  # LightningDiT-XL/1: 675M
    assert counts["total"] - counts["non_embedding"] == 1001 * 1152  # the label table (+ null class)
    assert isinstance(b, LightningDiT) and b.tokens_grid == (16, 16)


def test_config_checks():
    with pytest.raises(configlib.ConfigError, match="divisible"):
        configlib.load(DiTRunConfig, None, ["model.size=tiny", "model.heads=3"])
    with pytest.raises(configlib.ConfigError, match="size"):
        configlib.load(DiTRunConfig, None, ["model.size=XXXL"])
    with pytest.raises(configlib.ConfigError, match="cfg_interval_start"):
        configlib.load(DiTRunConfig, None, ["sample.cfg_interval_start=0.9", "sample.cfg_interval_end=0.5"])
    cfg = configlib.load(DiTRunConfig, None)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.train.ema_decay) == (2e-4, (0.9, 0.95), 0.0, 0.9999)
    assert (cfg.sample.shift, cfg.sample.steps, cfg.flow.time_sampling, cfg.label_dropout) == (0.3, 250, "logit_normal", 0.1)
    # a section given in part keeps the recipe's other defaults
    cfg = configlib.load(DiTRunConfig, None, ["train.steps=5", "optim.grad_clip=2.0"])
    assert (cfg.train.ema_decay, cfg.train.batch_size, cfg.optim.lr) == (0.9999, 1024, 2e-4)
    assert DiTModelConfig(size="L").shape == (24, 1024, 16)


@pytest.mark.parametrize("preset,size", [("dit_fmnist", "mini"), ("dit_B1_imagenet256", "B")])
def test_presets(preset, size):
    cfg = configlib.load(DiTRunConfig, preset)
    assert cfg.kind == "dit" and cfg.model.size == size and cfg.model.patch_size == 1
    assert cfg.sample.shift == 0.3 and cfg.flow.time_sampling == "logit_normal"
