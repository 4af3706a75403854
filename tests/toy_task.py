"""A small two-phase task (classifier + critic, with dropout and EMA) that exercises every part of
the training engine. Run as a script it trains into a run folder, so tests can SIGKILL it."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twostage.engine.config import TrainConfig
from twostage.engine.task import OptimConfig, OptimSpec, Phase, TaskBase
from twostage.engine.trainer import seed_everything, train


class ToyImages(torch.utils.data.Dataset):
    """Fixed random 1x12x12 images with 4 classes; (index, epoch) items get a deterministic flip."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(1234)
        self.images = torch.rand(n, 1, 12, 12, generator=g) * 2 - 1
        self.labels = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, None)
        image = self.images[index]
        if epoch is not None and (index * 7 + epoch) % 2:
            image = image.flip(-1)
        return image, self.labels[index]


class Net(nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        feat = self.drop(F.silu(self.conv(x))).mean(dim=(2, 3))
        return self.head(feat), feat


# The net's optimizer; `run(..., optim={...})` overrides these and puts them into the run's config.
NET_OPTIM = {"lr": 1e-2, "warmup_steps": 3, "schedule": "cosine", "weight_decay": 0.01}


class ToyTask(TaskBase):
    def __init__(self, dropout: float = 0.2, critic: bool = True, ema: bool = True,
                 net_optim: OptimConfig | None = None):
        self.modules = {"net": Net(dropout)}
        if critic:
            self.modules["critic"] = nn.Sequential(nn.Linear(16, 8), nn.SiLU(), nn.Linear(8, 1))
        self._ema = ema
        self._net_optim = net_optim or OptimConfig(**NET_OPTIM)

    def optimizers(self):
        specs = {"net": OptimSpec(["net"], self._net_optim)}
        if "critic" in self.modules:
            specs["critic"] = OptimSpec(["critic"], OptimConfig(kind="adam", lr=1e-3, grad_clip=None))
        return specs

    def phases(self):
        phases = [Phase("main", ["net"], self.main_loss)]
        if "critic" in self.modules:
            phases.append(Phase("critic", ["critic"], self.critic_loss, active=lambda step: step >= 2))
        return phases

    def ema_modules(self):
        return ["net"] if self._ema else []

    def main_loss(self, ctx):
        images, labels = ctx.batch
        logits, feat = ctx.models["net"](images)
        ce = F.cross_entropy(logits, labels)
        loss = ce
        if "critic" in ctx.models:
            loss = loss + 0.1 * ctx.models["critic"](feat).mean()
        ctx.scratch["feat"] = feat.detach()
        return loss, {"ce": ce}

    def critic_loss(self, ctx):
        out = ctx.models["critic"](ctx.scratch["feat"])
        return (out - 1).pow(2).mean(), {}


def run(run_dir: str, steps: int, **train_overrides) -> dict:
    """Train ToyTask into `run_dir`. Special keys: task={ToyTask kwargs}, task_class=a ToyTask subclass,
    optim={net OptimConfig overrides} (then the run's config gets an `optim.net` section, as a real
    config has), resume_changes=True (train's opt-in to resume with changed optimizer settings)."""
    torch.use_deterministic_algorithms(True)
    seed_everything(0)
    task_kwargs = dict(train_overrides.pop("task", {}))
    task_class = train_overrides.pop("task_class", ToyTask)
    optim = train_overrides.pop("optim", None)
    extra = {"resume_changes": True} if train_overrides.pop("resume_changes", False) else {}
    net_optim = None
    if optim is not None:
        net_optim = OptimConfig(**{**NET_OPTIM, **optim})
        task_kwargs["net_optim"] = net_optim
    task = task_class(**task_kwargs)
    defaults = dict(batch_size=8, log_every=5, ckpt_every=5, keep_checkpoints=3, num_workers=0, progress=False,
                    ema_decay=0.9, device="cpu")
    cfg = TrainConfig(steps=steps, **{**defaults, **train_overrides})
    full_config = {"train": cfg, "optim": {"net": net_optim}} if net_optim is not None else None
    return train(task, cfg, ToyImages(), Path(run_dir), full_config=full_config, **extra)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], int(sys.argv[2]), grad_accum=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
