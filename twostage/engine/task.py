"""What a trainable part tells the shared training engine.

A `Task` owns its modules and says how to train them; the engine owns everything else (device,
precision, compile, DDP, optimizers, schedules, clipping, accumulation, EMA, checkpoints, logging).

Training proceeds in *phases* per step. A phase has a loss function and the optimizers it steps;
the modules of those optimizers are the phase's trainable modules. A GAN tokenizer has two phases
("autoencoder": steps the tokenizer's and the CRT predictor's optimizers; "discriminator": steps the
discriminator's), a generator has one. Within a phase, the engine hands the loss function a view of
the modules in which the trained ones are wrapped for data parallelism and the others are plain and
frozen, so gradients only reach what the phase updates.

Phases of one step see the same micro-batches in order; `scratch` is a per-micro-batch dict shared
by the phases, so a later phase can reuse (detached) outputs of an earlier one instead of recomputing.

`on_start(run_dir, resumed)` is where a task writes its own run records (a generator's model.json): the
engine calls it once every check has passed (config against the saved one, checkpoint read and loaded)
and before it writes anything itself, so a refused run never reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import nn

from twostage.config import check

Logs = dict[str, float | torch.Tensor]
LossFn = Callable[["PhaseContext"], tuple[torch.Tensor, Logs]]


@dataclass
class OptimConfig:
    """One optimizer and its learning-rate schedule."""

    kind: str = field(default="adamw", metadata=check(choices=("adam", "adamw")))
    lr: float = field(default=1e-4, metadata=check(gt=0))
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = field(default=1e-8, metadata=check(gt=0))
    # Applied to matrices and convolution kernels only; norms, biases and embeddings-as-vectors get 0.
    weight_decay: float = field(default=0.0, metadata=check(ge=0))
    warmup_steps: int = field(default=0, metadata=check(ge=0))
    schedule: str = field(default="constant", metadata=check(choices=("constant", "cosine")))
    min_lr_ratio: float = field(default=0.0, metadata=check(ge=0, le=1))
    grad_clip: float | None = field(default=1.0, metadata=check(gt=0))
    fused: bool = True  # fused AdamW kernels on CUDA; ignored on CPU


@dataclass
class OptimSpec:
    """Which modules an optimizer updates, and how."""

    modules: list[str]
    config: OptimConfig


@dataclass
class Phase:
    name: str
    optimizers: list[str]
    loss: LossFn
    # A phase can be skipped on some steps (e.g. the discriminator before its start step).
    active: Callable[[int], bool] = lambda step: True
    # K > 1: the loss is the sum of K stacked replicas' losses (twostage/engine/replicas.py); the engine
    # logs it divided by K and clips each replica's gradient on its own.
    replicas: int = 1


@dataclass
class PhaseContext:
    """What a loss function receives."""

    batch: Any
    step: int
    models: Mapping[str, nn.Module]  # trained ones DDP-wrapped (if distributed), others frozen
    scratch: dict[str, Any]  # per micro-batch, shared by the phases of one step
    device: torch.device
    # Inside stacked replicas (twostage/engine/replicas.py): this replica's slice of every task's
    # `replica_tensors`, the state of its own data the loss reads (e.g. its cache's latent statistics).
    # Empty in a plain run, where the loss reads its task's own state.
    replica: Mapping[str, torch.Tensor] = field(default_factory=dict)


class Task(Protocol):
    """Implemented by tokenizers and generators (see twostage/tokenizers, twostage/generators)."""

    modules: dict[str, nn.Module]  # everything the checkpoint holds; names are stable file keys

    def optimizers(self) -> dict[str, OptimSpec]: ...

    def phases(self) -> list[Phase]: ...

    def ema_modules(self) -> list[str]:
        """Names of modules that get an exponential moving average (if train.ema_decay is set)."""
        ...

    def on_start(self, run_dir: Path, resumed: bool) -> None:
        """Called once before the first step, fresh (resumed=False) or resumed from a checkpoint (True,
        its state already loaded), after every config / checkpoint check has passed: the place to write
        the task's own run records. The run folder exists. Called on every process; write files from
        the main one only (RANK 0)."""
        ...

    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> Logs:
        """Called after each checkpoint (and at the end): sample grids, validation. May return logs."""
        ...

    def extra_state(self) -> dict[str, Any]:
        """JSON-able state of the task itself (e.g. codebook usage window) saved in checkpoints."""
        ...

    def load_extra_state(self, state: dict[str, Any]) -> None: ...


class TaskBase:
    """Defaults for the optional parts of the Task protocol."""

    modules: dict[str, nn.Module]

    def ema_modules(self) -> list[str]:
        return []

    def on_start(self, run_dir: Path, resumed: bool) -> None:
        pass

    def on_checkpoint(self, step: int, run_dir: Any, ema: Mapping[str, nn.Module]) -> Logs:
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def replica_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors of this task's own data that its loss reads (the same keys and shapes in every replica
        of one kind and config); stacked replicas pass each replica its own as `PhaseContext.replica`,
        so replicas may train on different caches. Default: none."""
        return {}


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module
