"""Golden outputs of LightningDiT's own network and sampler, for tests/test_convert_lightningdit.py.

    PYTHONPATH=/tmp/gpkgs python scripts/golden/lightningdit.py PEER_GIT [--rev HEAD] [--out tests/golden]

PEER_GIT is a git directory of hustvl/LightningDiT (a clone, or a bare mirror). The script takes
models/lightningdit.py with the modules it imports (models/swiglu_ffn.py, models/pos_embed.py,
models/rmsnorm.py) and the sampler (transport/*.py) at --rev out of it into a temporary folder and imports
them as they are. They need timm (PatchEmbed), einops (the RoPE table) and torchdiffeq (the ODE solver),
which the test suite does not: install them apart, e.g.
`pip install --target /tmp/gpkgs --no-deps timm einops torchdiffeq`. Two imports are satisfied by
stand-in modules that only exist to be imported, since nothing of them runs in the network:
`torchvision` (timm imports it at start-up; its CPU build must match torch exactly) and `fairscale`
(models/rmsnorm.py is a copy of Llama's model file; LightningDiT uses only its RMSNorm class, which needs
torch alone). The peer's `@torch.compile` decorators are switched off (TORCHDYNAMO_DISABLE), so its
code runs eagerly.

It builds a small LightningDiT with LightningDiT's own class and the published configuration's options
(SwiGLU, RoPE, RMSNorm, AdaLN with shift, no QK-norm, class dropout 0.1 so a null row): 2 blocks of width
64 with 4 heads (SwiGLU hidden int(2/3 * 256) = 170, which our rounding would make 176), patch size 2 on
8x8 latents of 4 channels (a 4x4 token grid: the output layout matters), 10 classes. Its trainable
weights are filled deterministically (the norm gains and AdaLN layers too, which LightningDiT
initialises to ones and zeros), its fixed buffers (the sin-cos `pos_embed` and the RoPE tables) are kept
as LightningDiT computes them and stored. In float32, the precision LightningDiT's code runs in (its
timestep embedder casts t's sinusoids to float32, so the network cannot run in float64), in eval mode:

- `velocity` (4, 4, 8, 8): the network at `x_t`, times `t` = (0, 0.3, 0.77, 1) and labels (3, 7, the null
  class 10, 0);
- `samples` (2, 4, 8, 8): its ODE sampler (transport.Sampler.sample_ode, Euler, num_steps 6, timestep
  shift 0.3, no guidance) from the noise `noise` with labels (2, 5): the last state;
- `variant.velocity`: the same at the same inputs for a variant with LightningDiT's two other options
  twostage converts, QK-norm and AdaLN without shift (`wo_shift`), at patch size 1 (its buffers stored as
  `variant.pos_embed`, ...; its weights filled the same way).

It writes tests/golden/lightningdit.safetensors with those tensors, pos_embed and feat_rope.freqs_cos /
freqs_sin, and in the metadata the commit, the architecture, the state dict's key layout and the sha256
of its filled weights (the test rebuilds them with the VQ test's `golden_tensor` fill and checks it); it
prints the commit.

Made with commit 2725fed42a14898744433809949834e26957bcdd (2025-06-12) of hustvl/LightningDiT.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # before torch is imported: the peer's @torch.compile runs eagerly

import argparse  # noqa: E402
import importlib.abc  # noqa: E402
import importlib.machinery  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_convert_llamagen_vq import golden_tensor, golden_values, weights_sha256  # noqa: E402

from peer import load_peer  # noqa: E402

PEER_FILES = ("models/__init__.py", "models/lightningdit.py", "models/swiglu_ffn.py", "models/pos_embed.py",
              "models/rmsnorm.py", "transport/__init__.py", "transport/transport.py", "transport/path.py",
              "transport/integrators.py", "transport/utils.py")
LAYERS, WIDTH, HEADS, PATCH, CHANNELS, LATENT, CLASSES = 2, 64, 4, 2, 4, 8, 10
TIMES = [0.0, 0.3, 0.77, 1.0]
LABELS = [3, 7, CLASSES, 0]  # CLASSES: the null class
SAMPLE_LABELS, SAMPLE_STEPS, SAMPLE_SHIFT = [2, 5], 6, 0.3  # num_steps 6: 5 Euler steps
FIXED = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")  # buffers LightningDiT computes
SEED = 0


class _Placeholder(type):
    """Any attribute of a stand-in module is a class, and any attribute of that class one too."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{cls.__name__}.{name}", (), {})


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import-only stand-ins for the top-level packages `roots` and everything under them."""

    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


# The variant: LightningDiT's other two options twostage converts, QK-norm and AdaLN without shift, at patch 1.
VARIANT = {"patch_size": 1, "use_qknorm": True, "wo_shift": True}


def build(peer, patch_size: int = PATCH, use_qknorm: bool = False, wo_shift: bool = False) -> torch.nn.Module:
    return peer.LightningDiT(input_size=LATENT, patch_size=patch_size, in_channels=CHANNELS, hidden_size=WIDTH,
                             depth=LAYERS, num_heads=HEADS, mlp_ratio=4.0, class_dropout_prob=0.1,
                             num_classes=CLASSES, learn_sigma=False, use_qknorm=use_qknorm, use_swiglu=True,
                             use_rope=True, use_rmsnorm=True, wo_shift=wo_shift)


def filled(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], str]:
    """Fill the model's trainable weights in place; (their layout, their sha256)."""
    state = model.state_dict()
    layout = {k: tuple(v.shape) for k, v in state.items() if k not in FIXED}
    weights = {k: golden_tensor(k, shape, SEED) for k, shape in layout.items()}
    model.load_state_dict({**state, **weights}, strict=True)
    return layout, weights_sha256(weights)


def values(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inputs in [-1, 1) scaled to unit variance, float32 (a pure function of the name)."""
    u = golden_values(name, int(torch.Size(shape).numel()), SEED) * 3**0.5
    return torch.from_numpy(u).float().reshape(shape)


@torch.no_grad()
def golden(peer, transport) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    model = build(peer)
    layout, sha = filled(model)
    state = model.state_dict()
    model.eval()

    n = len(LABELS)
    x = values("x_t", (n, CHANNELS, LATENT, LATENT))
    t = torch.tensor(TIMES)
    y = torch.tensor(LABELS)
    velocity = model(x, t, y)

    noise = values("noise", (len(SAMPLE_LABELS), CHANNELS, LATENT, LATENT))
    flow = transport.create_transport("Linear", "velocity", None, None, None)
    sample_fn = transport.Sampler(flow).sample_ode(sampling_method="euler", num_steps=SAMPLE_STEPS,
                                                   timestep_shift=SAMPLE_SHIFT)
    samples = sample_fn(noise, model.forward, y=torch.tensor(SAMPLE_LABELS))[-1]

    variant = build(peer, **VARIANT)
    variant_layout, variant_sha = filled(variant)
    variant_state = variant.state_dict()
    variant_velocity = variant.eval()(x, t, y)

    tensors = {"x_t": x, "t": t, "labels": y, "velocity": velocity, "noise": noise,
               "sample_labels": torch.tensor(SAMPLE_LABELS), "samples": samples,
               **{k: state[k].float() for k in FIXED}, "variant.velocity": variant_velocity,
               **{f"variant.{k}": variant_state[k].float() for k in FIXED}}
    meta = {"layers": str(LAYERS), "width": str(WIDTH), "heads": str(HEADS), "patch_size": str(PATCH),
            "channels": str(CHANNELS), "latent_size": str(LATENT), "num_classes": str(CLASSES),
            "sample_num_steps": str(SAMPLE_STEPS), "sample_timestep_shift": str(SAMPLE_SHIFT), "seed": str(SEED),
            "state_keys": json.dumps([[k, list(s)] for k, s in layout.items()]), "weights_sha256": sha,
            "variant": json.dumps(VARIANT),
            "variant_state_keys": json.dumps([[k, list(s)] for k, s in variant_layout.items()]),
            "variant_weights_sha256": variant_sha}
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer_git", type=Path, help="git directory of hustvl/LightningDiT (clone or bare)")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args()
    sys.meta_path.insert(0, _StandIns({"torchvision", "fairscale"}))
    peer, commit = load_peer(args.peer_git, args.rev, PEER_FILES, "models.lightningdit")
    import transport  # noqa: PLC0415  (the peer's package, from the same temporary folder)

    tensors, meta = golden(peer, transport)
    meta.update({"peer": f"hustvl/LightningDiT {PEER_FILES[1]}, transport/", "peer_commit": commit,
                 "torch": torch.__version__})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lightningdit.safetensors"
    save_file(tensors, str(path), metadata=meta)
    print(f"{path}: {path.stat().st_size // 1024} KB, |velocity| max {tensors['velocity'].abs().max():.3g}, "
          f"|samples| max {tensors['samples'].abs().max():.3g}")
    print(f"LightningDiT commit {commit}")


if __name__ == "__main__":
    main()
