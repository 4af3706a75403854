"""The DDT head of the LightningDiT generator (model.ddt; twostage/generators/dit/model.py `DDTHead`,
docs/methods.md (7.9)): shapes, per-token conditioning, re-embedding of x_t, the off switch, FLOPs, and a
tiny CPU run (train with REPA on the trunk, load, sample) through the CLI."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from twostage import api, config as configlib
from twostage.cli import main
from twostage.generators.dit.config import DDTConfig, DiTModelConfig, DiTRunConfig
from twostage.generators.dit.model import DDTHead, LightningDiT, build_dit, forward_flops_per_image

from test_dit_repa_shift import caches  # noqa: F401  (fixture: a tiny KL run's latent caches)

HEAD = DDTConfig(enabled=True, width=96, depth=2, heads=4)  # wider than the tiny trunk (64): P is a Linear


def tiny(ddt: DDTConfig | None = HEAD, **kw) -> LightningDiT:
    torch.manual_seed(0)
    return build_dit("tiny", in_channels=6, grid=(4, 4), num_classes=3, **({"ddt": ddt} if ddt else {}), **kw)


def perturb(model: LightningDiT) -> LightningDiT:
    """Leave the zero init, so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("patch", [1, 2])
def test_shapes_zero_init_and_structure(patch):
    model = tiny(patch_size=patch)
    assert isinstance(model.ddt, DDTHead) and not hasattr(model, "final") and not hasattr(model, "final_ada")
    x, t, y = torch.randn(5, 6, 4, 4), torch.rand(5), torch.tensor([0, 1, 2, 3, 3])
    out = model(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # zero AdaLN + output: v = 0
    head = model.ddt
    assert (head.width, head.depth, head.heads, head.ffn_hidden) == (96, 2, 4, 256)
    assert head.embed.weight.shape == (96, 6 * patch**2) and head.final.weight.shape == (6 * patch**2, 96)
    assert head.cond.weight.shape == (96, 64) and head.rope_cos.shape == (16 // patch**2, 1, 1, 24)
    # same width as the trunk: no projection (RAE's s_projector is the identity then)
    same = tiny(DDTConfig(enabled=True, width=64, depth=1, heads=2))
    assert isinstance(same.ddt.cond, torch.nn.Identity)
    # REPA's hidden tokens are the trunk's, at its width
    v, hidden = perturb(model)(x, t, y, hidden_at=2)
    assert v.shape == x.shape and hidden.shape == (5, 16 // patch**2, 64)
    with pytest.raises(ValueError, match="blocks 1..2"):
        model(x, t, y, hidden_at=3)


def test_each_token_is_modulated_by_its_own_trunk_token():
    model = perturb(tiny())
    head = model.ddt
    trunk, t_emb = torch.randn(2, 16, 64), torch.randn(2, 64)
    moved = trunk.clone()
    moved[1, 5] += 1.0  # one trunk token of sample 1
    with torch.no_grad():
        for block in [*head.blocks, head.final_ada]:
            ada = block.ada if hasattr(block, "ada") else block
            a, b = ada(head.conditioning(trunk, t_emb)), ada(head.conditioning(moved, t_emb))
            changed = (a - b).abs().amax(-1) > 0  # (N, T): which tokens' shift / scale / gate moved
            assert changed[1, 5] and changed.sum() == 1
        # the time embedding reaches every token
        a, b = head.conditioning(trunk, t_emb), head.conditioning(trunk, t_emb + 0.5)
        assert ((a - b).abs().amax(-1) > 0).all()
    # in the whole model, one input position changes the trunk's tokens everywhere (attention), but the
    # head's conditioning s_i is a function of trunk token i alone, as checked above.


def test_the_head_re_embeds_x_t():
    model = perturb(tiny())
    x, t, y = torch.randn(3, 6, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    seen = {}
    model.ddt.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
    out = model(x, t, y)
    # the head's first block sees its own embedding of the noisy input's patches, not the trunk's states
    torch.testing.assert_close(seen["tokens"], model.ddt.embed(model.patchify(x)))
    out.pow(2).mean().backward()
    assert model.ddt.embed.weight.grad.abs().sum() > 0  # the flow loss trains the head's patch embedding
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []  # and every trunk weight (the trunk reaches v through the head's conditioning)
    # at init the gradient reaches the head's embedding only through its output layer: zero there
    fresh = tiny()
    (fresh(x, t, y) - x).pow(2).mean().backward()
    assert fresh.ddt.final.weight.grad.abs().sum() > 0 and fresh.ddt.embed.weight.grad.abs().sum() == 0


def test_off_is_the_module_it_always_was():
    """Off (the default), the config, the parameters and their init are those of a model built before the
    option existed: no ddt key in config.yaml, the same state dict names, the same values for a seed."""
    cfg = configlib.load(DiTRunConfig, "dit_fmnist")
    saved = configlib.to_dict(cfg)["model"]
    assert "ddt" not in saved and not {"time_scale", "pos_order", "ffn_multiple_of"} & set(saved)
    plain = tiny(None)
    other_head = tiny(DDTConfig(enabled=False, width=32, depth=5, heads=2))  # off: its shape is ignored
    assert plain.ddt is None and other_head.ddt is None
    a, b = plain.state_dict(), other_head.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    top = sorted({k.split(".")[0] for k in a})
    assert top == ["blocks", "final", "final_ada", "patch_embed", "t_embed", "y_embed"]
    assert "ddt" not in plain.architecture()
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(perturb(plain)(x, torch.rand(2), torch.tensor([0, 1])).shape, x.shape)


@pytest.mark.parametrize("ddt", [None, HEAD, DDTConfig(enabled=True, width=64, depth=1, heads=4)])
def test_parameters_and_flops_are_counted(ddt):
    model = tiny(ddt, patch_size=2)
    counts = model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] - counts["non_embedding"] == 4 * 64  # the label table, 3 classes + null
    x = torch.randn(3, 6, 4, 4)
    with FlopCounterMode(display=False) as counter:  # counts every linear layer's matmul
        model(x, torch.rand(3), torch.tensor([0, 1, 2]))
    # the attention products (QK^T and AV, 4 T^2 w per block; not counted by FlopCounterMode on the CPU)
    tokens = 4
    attention = 2 * 4 * tokens**2 * 64 + (0 if ddt is None else ddt.depth * 4 * tokens**2 * ddt.width)
    per_image = (counter.get_total_flops() / 3) + attention
    assert model.flops_per_token()["forward"] * 16 == pytest.approx(per_image)
    head = None if ddt is None else (model.ddt.width, model.ddt.depth, model.ddt.ffn_hidden)
    assert forward_flops_per_image(2, 64, model.ffn_hidden, 6, 2, (4, 4), ddt=head) == pytest.approx(per_image)


def test_config_checks():
    with pytest.raises(configlib.ConfigError, match=r"model.ddt.width=90 is not divisible by model.ddt.heads=4"):
        configlib.load(DiTRunConfig, None, ["model.ddt.enabled=true", "model.ddt.width=90", "model.ddt.heads=4"])
    with pytest.raises(configlib.ConfigError, match=r"DDT head needs a head width .* = 10\) divisible by 4"):
        configlib.load(DiTRunConfig, None, ["model.ddt.enabled=true", "model.ddt.width=40", "model.ddt.heads=4"])
    with pytest.raises(configlib.ConfigError, match=r"repa.layer=3 .* 2 trunk blocks"):
        configlib.load(DiTRunConfig, None, ["model.size=tiny", "model.ddt.enabled=true", "repa.enabled=true",
                                            "repa.layer=3"])
    cfg = configlib.load(DiTRunConfig, None, ["model.ddt.enabled=true"])
    assert (cfg.model.ddt.width, cfg.model.ddt.depth, cfg.model.ddt.heads) == (2048, 2, 16)  # RAE's DiT-DH-XL
    assert configlib.to_dict(cfg)["model"]["ddt"]["enabled"] is True
    assert DiTModelConfig().ddt.enabled is False


def test_a_ddt_run_trains_with_repa_and_samples_through_the_cli(tmp_path, caches):
    train, val = caches
    run = tmp_path / "ddt"
    assert main(["generator", "train", "dit_fmnist", "model.size=tiny", "model.ddt.enabled=true",
                 "model.ddt.width=96", "model.ddt.heads=4", "model.ddt.depth=1", "repa.enabled=true", "repa.layer=2",
                 "repa.projector_dim=16", "train.steps=3", "train.batch_size=4", "train.ckpt_every=3",
                 "train.log_every=1", "train.num_workers=0", "train.device=cpu", "train.progress=false",
                 "sample.grid_at_checkpoint=2", "sample.grid_steps=2", "val.batch_size=4",
                 "--tokens", str(train), "--val-tokens", str(val), "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("flow/repa" in r for r in rows) and (run / "samples" / "step_0000003.png").is_file()
    info = json.loads((run / "model.json").read_text())
    assert info["ddt"] == {"width": 96, "depth": 1, "heads": 4, "ffn_hidden": 256}
    model, loaded = api.load_generator(run)
    assert isinstance(model.ddt, DDTHead) and loaded["step"] == 3
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    # the generator's (trunk + head) training FLOPs, plus REPA's projector (3 x forward per patch token)
    projector = 2 * (model.width * 16 + 16 * 16 + 16 * 112)
    assert info["train_flops_per_token"] == pytest.approx(model.flops_per_token()["train"] + 3 * projector / model.patch ** 2)
    ema = load_file(str(run / "checkpoints" / "step_0000003" / "ema.safetensors"))
    assert any(k.startswith("dit.ddt.embed.") for k in ema) and not any(k.startswith("dit.final") for k in ema)
    # training moved the head's patch embedding (the flow loss reaches it once the output layer is nonzero)
    torch.manual_seed(0)
    fresh = LightningDiT(loaded["config"].model, 4, (4, 4), 3)
    raw = load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors"))
    assert not torch.equal(raw["dit.ddt.final.weight"], fresh.ddt.final.weight)
    assert main(["generator", "sample", str(run), "--num", "3", "--out", str(tmp_path / "s.npz"), "--device", "cpu",
                 "--steps", "2", "--cfg", "1.5", "--grid", "0"]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and f["arr_0"].dtype == np.uint8
