"""Exponential moving average of model weights, kept in fp32 beside the trained modules."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights, after every optimizer step.

    Buffers (e.g. running statistics) are copied, not averaged. The EMA copies are ordinary modules
    (eval mode, no grad) so a task can sample from them directly.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        self.decay = decay
        self.modules = {name: self._frozen_copy(m) for name, m in modules.items()}
        self._sources = modules

    @staticmethod
    def _frozen_copy(module: nn.Module) -> nn.Module:
        shadow = copy.deepcopy(module).float().eval()
        shadow.requires_grad_(False)
        return shadow

    @torch.no_grad()
    def update(self) -> None:
        for name, shadow in self.modules.items():
            source = self._sources[name]
            ema_params = list(shadow.parameters())
            params = [p.detach().float() for p in source.parameters()]
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
            for b_ema, b in zip(shadow.buffers(), source.buffers()):
                b_ema.copy_(b)
