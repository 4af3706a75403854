"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the training engine (`train.parallel: fsdp`).

Sharding units. A model names the submodules that are its FSDP units with a class attribute

    shard_units = ("blocks",)      # names of nn.ModuleList attributes: each item is one unit

(ARTransformer, LightningDiT and its DDT head do). Every module in the tree that declares it gets its
listed items sharded first, then the trained module itself is sharded as the root unit (embeddings,
final norm, head). A module without `shard_units` is one unit: its parameters are still sharded at
rest (weights, gradients, optimizer state), only the forward gathers all of them at once. The engine
never looks at kind names; parameter names (state_dict keys) are those of the plain module.

Precision: on CUDA with bf16 (train.precision auto/bf16) the gathered parameters are bf16 and the
gradient reduce-scatter is fp32 (the sharded master weights, the optimizer state and the EMA stay fp32);
otherwise everything is fp32 (CPU, train.precision=fp32).

Checkpoints (written by every rank, trainer.py `_save_sharded`): `step_N/dcp/` holds the model, EMA and
optimizer states as torch.distributed.checkpoint shards (each rank writes its own; resharded on load,
so a run can resume on another world size), and rank 0 also writes the consolidated
`model.safetensors` / `ema.safetensors` (full fp32 tensors, the keys of an unsharded run) and the small
`state.json`, so sampling, evaluation and every loader read an FSDP run like any other run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from twostage.config import ConfigError

DCP_DIR = "dcp"  # the sharded part of a checkpoint folder


def available() -> str | None:
    """None when this torch build has FSDP2 and DCP; otherwise why not (one line)."""
    if not dist.is_available():
        return "this torch build has no torch.distributed"
    try:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return f"this torch build ({torch.__version__}) has no FSDP2 / distributed checkpoint ({err})"
    return None


def require() -> None:
    reason = available()
    if reason:
        raise ConfigError(f"train.parallel=fsdp: {reason}; use train.parallel=ddp or torch >= 2.6")


def units(module: nn.Module) -> list[nn.Module]:
    """The submodules declared as FSDP units (`shard_units`) anywhere in `module`, deepest first, so
    that each is sharded before any unit that contains it."""
    found: list[tuple[int, nn.Module]] = []
    for path, sub in module.named_modules():
        for name in getattr(type(sub), "shard_units", ()):
            target = sub.get_submodule(name)
            items = list(target) if isinstance(target, nn.ModuleList) else [target]
            where = f"{path}.{name}" if path else name
            found += [(where.count(".") + 1, item) for item in items]
    found.sort(key=lambda pair: -pair[0])  # stable: model order within a depth
    return [m for _, m in found]


def shard(module: nn.Module, mesh, bf16: bool) -> None:
    """fully_shard every declared unit of `module`, then `module` itself (in place)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for unit in units(module):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def device_mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def plain_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of an unsharded module: what rank 0 loads the gathered weights into for the side
    work at checkpoints (sampling, validation), which runs on rank 0 alone."""
    return copy.deepcopy(module).cpu()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a plain tensor as it is)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (clip_grad_norm_ returns a replicated one)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


class ShardedState:
    """The sharded training state (modules, EMA copies, optimizers) as one DCP state dict."""

    def __init__(self, modules: dict[str, nn.Module], ema: dict[str, nn.Module] | None,
                 optimizers: dict[str, torch.optim.Optimizer]):
        # ModuleDicts only hold references: the keys are "<module>.<param>", as in plain checkpoints.
        self.modules = nn.ModuleDict(modules)
        self.ema = nn.ModuleDict(ema) if ema else None
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state: dict[str, Any] = {
            "model": get_model_state_dict(self.modules),
            "optim": {n: get_optimizer_state_dict(self.modules, o) for n, o in self.optimizers.items()},
        }
        if self.ema is not None:
            state["ema"] = get_model_state_dict(self.ema)
        return state

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state_dict(), checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        """Load in place; the optimizers keep the hyperparameters they were built with (the config
        being run), only their per-parameter state (moments, step counts) comes from the checkpoint."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self.state_dict()
        dcp.load(state, checkpoint_id=str(folder))
        set_model_state_dict(self.modules, state["model"])
        if self.ema is not None:
            set_model_state_dict(self.ema, state["ema"])
        for name, opt in self.optimizers.items():
            fresh = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups]
            set_optimizer_state_dict(self.modules, opt, state["optim"][name])
            for group, hyper in zip(opt.param_groups, fresh):
                group.update(hyper)

    def full_tensors(self, which: str) -> dict[str, torch.Tensor] | None:
        """Gathered CPU tensors of "model" or "ema" on rank 0 (None on the others); a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        container = self.modules if which == "model" else self.ema
        state = get_model_state_dict(container, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, value in state.items():
            t = value.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in seen:  # tied weights: safetensors refuses shared storage
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            out[key] = t
        return out
