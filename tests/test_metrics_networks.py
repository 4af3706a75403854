"""Inception-v3 (both file formats) and DINOv2 loaders, with random weights saved to disk; the
layering of twostage/backbones/ under metrics/ and tokenizers/."""

import ast
import hashlib
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

import twostage
from twostage.backbones import load_feature_network
from twostage.backbones.dinov2 import DINOv2ViT, load_dinov2
from twostage.backbones.inception import (
    ConvBN,
    FIDInceptionV3,
    from_pytorch_fid_state_dict,
    load_inception,
    to_pytorch_fid_state_dict,
)
from twostage.common.errors import UserError


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    d = tmp_path_factory.mktemp("inception")
    ts, pf = d / "inception-2015-12-05.pt", d / "pt_inception-2015-12-05.pth"
    torch.jit.script(net).save(str(ts))
    torch.save(to_pytorch_fid_state_dict(net), pf)
    return net, ts, pf


def test_inception_torchscript_format(inception_files):
    net, ts, _ = inception_files
    fn = load_feature_network("inception-v3", str(ts))
    assert fn.name == "InceptionV3" and fn.file_format == "torchscript"
    # the recorded checksum is the plain sha256 of the file's bytes (comparable with older records)
    assert fn.checksum == hashlib.sha256(ts.read_bytes()).hexdigest() and fn.input_size == 299
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        out = fn(x)
        assert out["pool"].shape == (2, 2048)
        assert out["spatial"].shape == (2, 17 * 17 * 7)
        assert out["logits"].shape == (2, 1008)
        # same numbers as the file's own forward on [0, 255] input (its call convention)
        ref = torch.jit.load(str(ts))((x + 1) * 127.5, return_features=True)
    torch.testing.assert_close(out["pool"], ref, rtol=1e-4, atol=1e-5)


def test_inception_pytorch_fid_format(inception_files):
    net, _, pf = inception_files
    fn = load_inception(pf)
    assert fn.file_format == "pytorch-fid"
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        pool = fn(x)["pool"]
        # pytorch-fid preprocessing: plain bilinear resize of the [-1, 1] image
        x299 = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        ref = net.layers(x299).mean(dim=(2, 3))
    assert pool.shape == (2, 2048)
    torch.testing.assert_close(pool, ref, rtol=1e-4, atol=1e-5)


def test_pytorch_fid_bn_scale_is_folded_exactly():
    torch.manual_seed(1)
    conv, bn = torch.nn.Conv2d(4, 6, 3, bias=False), torch.nn.BatchNorm2d(6, eps=1e-3).eval()
    for t in (bn.weight, bn.bias, bn.running_mean):
        t.data.normal_()
    bn.running_var.data.uniform_(0.5, 2)
    layer = ConvBN(4, 6, 3)
    # reuse the full translation on a one-layer dict by faking the other entries from a real net
    sd = to_pytorch_fid_state_dict(FIDInceptionV3())
    sd.update({"Conv2d_1a_3x3.conv.weight": conv.weight.data, "Conv2d_1a_3x3.bn.weight": bn.weight.data,
               "Conv2d_1a_3x3.bn.bias": bn.bias.data, "Conv2d_1a_3x3.bn.running_mean": bn.running_mean,
               "Conv2d_1a_3x3.bn.running_var": bn.running_var})
    nat = from_pytorch_fid_state_dict(sd)
    layer.load_state_dict({k.split(".")[-1]: v for k, v in nat.items() if k.startswith("layers.conv.")})
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(layer(x), torch.relu(bn(conv(x))), rtol=1e-4, atol=1e-5)


def test_inception_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05") as err:
        load_feature_network("inception-v3")
    assert isinstance(err.value, UserError)
    bad = tmp_path / "other.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(bad))
    with pytest.raises(ValueError, match="do not fit") as err:
        load_inception(bad)
    assert isinstance(err.value, UserError)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="neither pytorch-fid's Inception state dict"):
        load_feature_network("fid-inception", tmp_path / "other.pth")


def _dinov2_state(registers: int):
    torch.manual_seed(2)
    vit = DINOv2ViT(dim=128, depth=2, registers=registers, pos_grid=5)
    return vit.state_dict()


def test_dinov2_official_and_timm_formats(tmp_path):
    sd = _dinov2_state(registers=4)
    official = tmp_path / "dinov2_official.pth"
    torch.save(sd, official)
    # timm layout: registers as reg_token, position embedding without the cls slot, no mask token
    timm_sd = {k: v for k, v in sd.items() if k not in ("mask_token", "register_tokens", "pos_embed")}
    timm_sd["reg_token"] = sd["register_tokens"]
    timm_sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
    timm_sd["pos_embed"] = sd["pos_embed"][:, 1:]
    timm_file = tmp_path / "dinov2_timm.pth"
    torch.save(timm_sd, timm_file)

    a, b = load_dinov2(official), load_feature_network("dinov2", str(timm_file))
    assert a.name == "DINOv2-ViT-128d14-reg4" and len(a.checksum) == 64
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert oa["pool"].shape == (2, 128) and oa["spatial"].shape == (2, 16 * 16 * 8)
    torch.testing.assert_close(oa["pool"], ob["pool"], rtol=1e-4, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    maps = a.feature_maps(xg, size=56)
    assert all(m.shape[-2:] == (4, 4) for m in maps)
    sum(m.square().mean() for m in maps).backward()
    assert xg.grad.abs().sum() > 0


def test_dinov2_needs_weights():
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain.pth"):
        load_feature_network("dinov2")


def test_dinov2_wrong_file_is_a_user_error(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "not_dinov2.pth")
    with pytest.raises(UserError, match="no cls_token"):
        load_feature_network("dinov2-vitl14", tmp_path / "not_dinov2.pth")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_backbones_are_the_bottom_layer():
    """Networks import no metric or loss code; tokenizers use only the metric functions (frechet,
    reconstruction, latent, protocol: their validation at checkpoints), never the run-level metric
    modules that load tokenizer runs (evaluate, commands): no import cycles."""
    root = Path(twostage.__file__).parent
    for path in (root / "backbones").rglob("*.py"):
        ours = {m for m in _imported_modules(path) if m.startswith("twostage")}
        assert all(m.startswith(("twostage.backbones", "twostage.common", "twostage.config")) for m in ours), \
            (path, ours)
    for path in (root / "tokenizers").rglob("*.py"):
        for module in (m for m in _imported_modules(path) if m.startswith("twostage.metrics")):
            source = root.parent / (module.replace(".", "/") + ".py")
            assert source.is_file(), (path, module)
            assert not any(m.startswith("twostage.tokenizers") for m in _imported_modules(source)), (path, module)
