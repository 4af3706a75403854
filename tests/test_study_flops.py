"""Generator FLOPs accounting (each kind's formula beside its model; the compute C of twostage/study/flops.py)
against hand counts and torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from twostage.common.errors import UserError
from twostage.generators.ar import model as ar
from twostage.generators.ar.config import ARModelConfig
from twostage.generators.dit import model as dit
from twostage.generators.dit.config import DiTModelConfig
from twostage.study import flops


def counted(fn) -> int:
    # The math backend decomposes attention into matmuls that the counter sees (the fused CPU kernel
    # is not registered with it).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def test_ar_matches_a_hand_count_and_the_flop_counter():
    # 1 layer, width 8, hidden 16, vocabulary 10, sequence 4, per token (2 FLOPs per multiply-add):
    # qkv 2*8*24 = 384, out 2*8*8 = 128, gate+up 2*8*32 = 512, down 2*16*8 = 256,
    # attention 2 * (2*4*8) = 128, head 2*8*10 = 160  -> 1568 forward, 4704 training.
    assert ar.forward_flops_per_token(1, 8, 16, 10, 4) == 1568

    cfg = ARModelConfig(size="tiny", ffn_multiple_of=32)
    model = ar.ARTransformer(cfg, vocab_size=37, num_classes=5, grid=(3, 4)).eval()
    layers, width, _ = cfg.shape
    per_token = ar.forward_flops_per_token(layers, width, cfg.ffn_hidden, 37, model.seq_len)
    assert model.flops_per_token() == {"forward": per_token, "train": 3 * per_token}
    tokens = torch.randint(0, 37, (2, 12))
    assert counted(lambda: model(tokens, torch.tensor([1, 2]))) == 2 * 12 * per_token


def test_ar_is_six_n_d_plus_the_attention_term():
    cfg = ARModelConfig(size="mini")
    model = ar.ARTransformer(cfg, vocab_size=1024, num_classes=10, grid=(8, 8))
    layers, width, _ = cfg.shape
    n = ar.matmul_parameters(layers, width, cfg.ffn_hidden, 1024)
    norms = width * (2 * layers + 1)  # RMSNorm gains: parameters without matmuls
    assert n == model.param_counts()["non_embedding"] - norms
    per_token = model.flops_per_token()["train"]
    attention = 12 * layers * width * model.seq_len
    assert per_token == 6 * n + attention
    assert attention / per_token < 0.1  # short sequences: 6 N D dominates
    tokens_seen, c = flops.training_compute(per_token, steps=100, batch_size=32, tokens_per_image=64)
    assert tokens_seen == 100 * 32 * 64 and c == per_token * tokens_seen


def test_dit_matches_a_hand_count_and_the_flop_counter():
    # 1 layer, width 8, hidden 16, 2 channels, patch 1, grid 2x2 (T = 4 tokens):
    # per token: patch in 2*2*8 = 32, out 2*8*2 = 32, qkv 384, out 128, gate+up 512, down 256,
    #            attention 2*(2*4*8) = 128                                   -> 1472 x 4 = 5888
    # per image: time MLP 2*256*8 + 2*8*8 = 4224, AdaLN 2*8*48 = 768, final AdaLN 2*8*16 = 256 -> 5248
    assert dit.forward_flops_per_image(1, 8, 16, 2, 1, (2, 2)) == 5888 + 5248

    for patch in (1, 2):
        cfg = DiTModelConfig(size="tiny", patch_size=patch)
        model = dit.LightningDiT(cfg, in_channels=4, grid=(4, 6), num_classes=5).eval()
        layers, width, _ = cfg.shape
        expected = dit.forward_flops_per_image(layers, width, dit.ffn_hidden(width, 4.0), 4, patch, (4, 6))
        x, t, y = torch.randn(3, 4, 4, 6), torch.rand(3), torch.tensor([0, 1, 5])
        assert counted(lambda: model(x, t, y)) == 3 * expected


def test_dit_flops_per_token_are_per_latent_position():
    # 2 layers, width 64, 8 channels, patch 2 on a 4x4 latent grid: per token = per image / 16 positions
    model = dit.LightningDiT(DiTModelConfig(size="tiny", patch_size=2), in_channels=8, grid=(4, 4), num_classes=3)
    per_image = 3 * dit.forward_flops_per_image(2, 64, dit.ffn_hidden(64, 4.0), 8, 2, (4, 4))
    assert model.flops_per_token()["train"] == per_image / 16 and model.flops_per_token()["train_per_image"] == per_image


def test_compute_from_any_model_json():
    assert flops.recorded_flops_per_token({"kind": "dit", "train_flops_per_token": 12.5}) == 12.5
    with pytest.raises(UserError, match="train_flops_per_token"):
        flops.recorded_flops_per_token({"kind": "ar", "flops_per_token_train": 1.0})
