"""Optimizers and learning-rate schedules built from `OptimConfig`."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from twostage.engine.task import OptimConfig


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Decay matrices and convolution kernels only: decaying gains, biases or norms hurts and is
    not what the papers do (LlamaGen / nanoGPT convention)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in modules:
        stacked = getattr(module, "replica_dims", 0)  # replicas stacked in front (engine/replicas.py)
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.ndim - stacked >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# optim.kind -> class. Adam's weight decay is coupled (an L2 term); AdamW's is decoupled (arXiv:1711.05101).
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(modules: list[nn.Module], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(modules, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("an optimizer was given modules without trainable parameters")
    cls = OPTIMIZERS[cfg.kind]
    fused = cfg.fused and device.type == "cuda"
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def match_state_layout_(opt: torch.optim.Optimizer) -> None:
    """Give each per-parameter state tensor (Adam's moments) its parameter's strides, in place.

    A checkpoint stores tensors contiguous, and `load_state_dict` keeps the loaded strides; a
    channels_last parameter (the tokenizers' compiled CUDA path) then meets NCHW moments, which the
    fused CUDA Adam kernel rejects ("params, grads, exp_avgs, and exp_avg_sqs must have same dtype,
    device, and layout") at the first step after a resume. Values are unchanged."""
    for param, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the base LR at `step` (0-based): linear warmup, then constant or cosine."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg, total_steps))
