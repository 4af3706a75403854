"""K replicas of one model trained as one: stacked weights, one vmapped loss, per-replica clipping.

A study needs every cell trained with several seeds (and, on the same grid point, on several tokenizers
with the same code shape), and every tokenizer config with several seeds. Trained one by one, each
replica of a small generator or tokenizer runs hundreds of tiny kernels per step and leaves the GPU
idle; stacked, one kernel serves all K (a (K, ...) weight and a (K, B, ...) batch under
`torch.func.vmap`), so K replicas cost little more than one.

Each replica stays *the same run* it would be alone, up to floating-point rounding:

* initialization: each replica's Task is built after `seed_everything(its train.seed)`, exactly as
  a single run builds it, and its weights are stacked afterwards;
* data: each replica reads its own cache (or image dataset) in its own order (twostage/data/stacked.py:
  one loader per replica, seeded with that replica's seed), and what its loss reads of that cache (the DiT's latent
  statistics) reaches it as its slice of the stacked `Task.replica_tensors` (PhaseContext.replica);
* loss: the phase's loss is the *sum* of the replicas' own losses, so each replica's gradient is the
  gradient of its own loss (a mean over replicas would scale it by 1/K, which gradient clipping and
  Adam's epsilon would notice);
* optimizer: Adam(W) and the EMA act element by element, so one optimizer over stacked weights is K
  optimizers; weight decay applies to the parameters a single run decays (`replica_dims`: the
  stacked dimension does not count, twostage/engine/optim.py), and gradient clipping is per replica
  (`clip_per_replica_`);
* attention runs on SDPA's math backend inside the replicas' loss (the fused kernels fail under vmap);
* random draws inside the loss (dropout, label dropout, noise, timesteps) use `vmap`'s
  randomness="different": independent per replica, but not the stream a single run would draw, so a
  packed run equals separate runs in distribution, and bit for bit only without randomness (tested).

A task may have later phases (a GAN tokenizer's discriminator from loss.disc_start) only when they
never run in this run (inactive at every step of [0, train.steps)): the first phase is stacked, and a
run in which a later phase would start is refused up front (a ConfigError). A task whose loss keeps
state of its own, which a vmapped function may not write, takes part through two optional hooks
(duck-typed, like `replica_tensors`):

* `as_replica()`, called once when ReplicaTask is built: switch that state off in the loss (a
  tokenizer's preview capture and codebook-usage window, twostage/tokenizers/autoencoder_task.py);
* `replica_first_batch(batch, device)`, called once per process outside vmap with the replica's own
  slice of the first micro-batch: keep what a single run keeps of its first batch (a tokenizer's
  preview images) and move frozen networks to the device outside the vmapped (maybe compiled) loss.

Every replica gets a normal run folder (config.yaml, run.json, model.json, validation records, sample
grids, checkpoints with its own model / EMA weights) written at each checkpoint of the joint run, so
sampling, evaluation and the study table read it like any other run; run.json's "replica_of" names
the joint run folder, which holds the stacked checkpoints the joint run resumes from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from twostage import config as configlib
from twostage.engine import checkpoint as ckpt
from twostage.engine.run_files import run_environment
from twostage.engine.task import Phase, PhaseContext, Task, TaskBase


class StackedModule(nn.Module):
    """K modules of one architecture as one: every parameter becomes a (K, ...) parameter.

    The first module is kept (outside the module tree, so its own weights are neither trained nor saved)
    as the architecture that `functional_call` runs with one replica's slice of the stacked weights;
    its buffers (e.g. RoPE tables) are shared by all replicas and must be equal in all of them."""

    replica_dims = 1  # leading dimensions that index replicas (twostage/engine/optim.py reads it)

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        if not modules:
            raise ValueError("StackedModule needs at least one module")
        base = modules[0]
        self.names = [name for name, _ in base.named_parameters()]
        shapes = {name: p.shape for name, p in base.named_parameters()}
        shared = dict(base.named_buffers())
        params = []
        for k, module in enumerate(modules):
            named = dict(module.named_parameters())
            if list(named) != self.names or any(named[n].shape != shapes[n] for n in self.names):
                differ = [n for n in self.names if n not in named or named[n].shape != shapes[n]]
                raise ValueError(f"replica {k} has another architecture than replica 0 (parameters "
                                 f"{', '.join(differ[:4]) or 'names'} differ); replicas must share one model shape")
            for name, buffer in module.named_buffers():
                if not torch.equal(buffer, shared[name]):
                    raise ValueError(f"replica {k}'s buffer {name} differs from replica 0's; replicas share buffers")
            params.append(named)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.stack([p[n].detach() for p in params]), requires_grad=params[0][n].requires_grad)
             for n in self.names])
        self._base = [base]  # a list hides it from parameters(), state_dict() and the optimizer

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def replicas(self) -> int:
        return self.weights[0].shape[0]

    def stacked(self) -> dict[str, torch.Tensor]:
        """{parameter name of the architecture: (K, ...) tensor}: what `vmap` slices per replica."""
        return dict(zip(self.names, self.weights))

    def train(self, mode: bool = True) -> StackedModule:
        super().train(mode)
        self.base.train(mode)  # dropout in the functional calls follows the stacked module's mode
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.base._apply(fn, recurse)  # buffers (and the unused base weights) follow device and dtype
        return self

    def replica_state(self, k: int) -> dict[str, torch.Tensor]:
        """The state dict replica k has as a plain module (its weight slices and the shared buffers)."""
        state = {name: w[k].detach() for name, w in zip(self.names, self.weights)}
        persistent = self.base.state_dict()
        state.update({n: b for n, b in persistent.items() if n not in state})
        return state

    def replica(self, k: int) -> nn.Module:
        """Replica k as an ordinary module (a copy; for validation, sample grids and its checkpoint)."""
        module = copy.deepcopy(self.base)
        module.load_state_dict(self.replica_state(k), strict=True)
        module.train(self.training)
        return module

    def forward(self, *args, **kwargs):
        raise TypeError("a StackedModule is called through ReplicaTask's vmapped loss, one replica at a time")


class _ReplicaView:
    """What a replica's loss function sees as its model: the architecture called with one replica's
    weights (inside vmap); attributes (null_class, num_tokens, ...) are the architecture's."""

    def __init__(self, base: nn.Module, weights: dict[str, torch.Tensor]):
        self._module, self._weights = base, weights

    def __call__(self, *args, **kwargs):
        return functional_call(self._module, self._weights, args, kwargs, strict=False)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def clip_per_replica_(params: list[torch.Tensor], max_norm: float, replicas: int) -> torch.Tensor:
    """Clip each replica's gradient (the slices [k] of every parameter's grad) to global norm `max_norm`,
    as `clip_grad_norm_` does for one run; returns the K norms before clipping. No host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(replicas)
    squares = torch.stack([g.detach().float().reshape(replicas, -1).square().sum(1) for g in grads]).sum(0)
    norms = squares.sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype).view(replicas, *([1] * (g.ndim - 1))))
    return norms


def replica_configs(cfg: Any, seeds: Sequence[int]) -> list[Any]:
    """The config of each replica: `cfg` with train.seed set to that replica's seed."""
    return [dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=int(s))) for s in seeds]


def check_replica_folders(outs: Sequence[str | Path], pack: str | Path) -> None:
    """The run folders of K replicas and their joint run: at least one, all distinct (a ConfigError)."""
    k = len(outs)
    if k < 1:
        raise configlib.ConfigError("replicas: give at least one --out run folder")
    folders = [Path(o).resolve() for o in outs]
    if len(set(folders)) != k:
        raise configlib.ConfigError("replicas: two replicas have the same --out folder; each replica needs its own")
    if Path(pack).resolve() in folders:
        raise configlib.ConfigError(f"replicas: --pack {pack} is also a replica's --out; the joint run needs its "
                                    "own folder")


def add_replica_options(parser: Any, out_help: str) -> None:
    """The options of a `train` command that can train replicas: --out (one run folder, or several: one
    per replica), --seeds and --pack (the joint run's folder). Overrides written after the folders are
    given back to the overrides by twostage/cli.py."""
    parser.add_argument("--out", required=True, type=Path, nargs="+", help=out_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="replicas: train.seed of each --out (twostage/engine/replicas.py)")
    parser.add_argument("--pack", type=Path, default=None,
                        help="replicas: folder of the joint run (stacked checkpoints; an interrupted run resumes there)")


def wants_replicas(args: Any) -> bool:
    """Whether a `train` command line with `add_replica_options` asks for replicas (several --out, or
    --seeds / --pack); then it needs both --seeds and --pack (a ConfigError otherwise)."""
    if args.pack is None and args.seeds is None and len(args.out) == 1:
        return False
    if args.pack is None or args.seeds is None:
        raise configlib.ConfigError("replicas (several --out) need --seeds (one per --out) and --pack "
                                    "(the joint run's folder)")
    return True


def replica_slice(batch: Any, k: int) -> Any:
    """Replica k's batch out of a stacked one: the inverse of twostage/data/stacked.py `stack_batches`."""
    if isinstance(batch, torch.Tensor):
        return batch[k]
    if isinstance(batch, dict):
        return {name: replica_slice(value, k) for name, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(replica_slice(part, k) for part in batch)
    raise TypeError(f"cannot slice a replica out of a batch holding a {type(batch).__name__}")


def check_later_phases_idle(task: Task, steps: int) -> None:
    """Refuse a task whose phases after the first would run in [0, steps): only the first is stacked
    (a GAN tokenizer's discriminator phase may exist as long as loss.disc_start >= train.steps)."""
    for phase in task.phases()[1:]:
        start = next((step for step in range(steps) if phase.active(step)), None)
        if start is not None:
            raise configlib.ConfigError(
                f"phase {phase.name!r} of {type(task).__name__} starts at step {start} < train.steps={steps}: stacked "
                "replicas train only a task's first phase; train the replicas separately or keep that phase off "
                "for the whole run")


class ReplicaTask(TaskBase):
    """K Tasks of one kind and config (train.seed aside) trained as one (see the module docstring).

    tasks: built per replica (seeded with that replica's seed); run_dirs: each replica's run folder;
    configs: each replica's full config (written to its config.yaml; configs[0].train.steps bounds the
    steps at which a task's later phases must stay inactive)."""

    def __init__(self, tasks: list[Task], run_dirs: list[Path], configs: list[Any]):
        if not tasks or len(tasks) != len(run_dirs) or len(tasks) != len(configs):
            raise ValueError("ReplicaTask needs as many run folders and configs as tasks (at least one)")
        first = tasks[0]
        check_later_phases_idle(first, int(configs[0].train.steps))
        self.tasks, self.run_dirs, self.configs = tasks, [Path(d) for d in run_dirs], configs
        for task in tasks:
            if hasattr(task, "as_replica"):
                task.as_replica()
        self.modules: dict[str, nn.Module] = {
            name: StackedModule([t.modules[name] for t in tasks]) for name in first.modules}
        self._own: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._handed_first_batch = False

    @property
    def replicas(self) -> int:
        return len(self.tasks)

    def optimizers(self):
        return self.tasks[0].optimizers()

    def ema_modules(self) -> list[str]:
        return self.tasks[0].ema_modules()

    def phases(self) -> list[Phase]:
        phase = self.tasks[0].phases()[0]
        return [Phase(phase.name, phase.optimizers, self._stacked_loss(phase), phase.active, replicas=self.replicas)]

    def _stacked_loss(self, phase: Phase):
        names = list(self.modules)
        bases = {n: m.base for n, m in self.modules.items()}

        def stacked_values(weights: dict[str, dict[str, torch.Tensor]], batch: Any, own: dict[str, torch.Tensor],
                           step: int, device: torch.device):
            def one(w: dict[str, dict[str, torch.Tensor]], b: Any, r: dict[str, torch.Tensor]):
                models = {n: _ReplicaView(bases[n], w[n]) for n in names}
                value, logs = phase.loss(PhaseContext(b, step, models, {}, device, replica=r))
                return value, {k: torch.as_tensor(v, device=device) for k, v in logs.items()}

            # The fused attention kernels (flash / efficient / cuDNN) get strides under vmap they do not
            # support: "LSE is not correctly aligned" in fp32 and NaN gradients in bf16 (H200, torch
            # 2.11). The math backend is plain matmuls and softmax, which vmap batches correctly; at
            # the sequence lengths of small generators it costs little.
            with sdpa_kernel([SDPBackend.MATH]):
                return vmap(one, randomness="different")(weights, batch, own)

        # train.compile: the vmapped loss is what runs (StackedModule.forward never does), so it is what
        # the engine's compile flag compiles; elementwise work and the math-backend attention then fuse.
        train = self.configs[0].train
        run = torch.compile(stacked_values, **train.compile_options) if train.compile else stacked_values

        def loss(ctx: PhaseContext):
            if not self._handed_first_batch:
                self._hand_first_batch(ctx.batch, ctx.device)
            own = self._replica_tensors(ctx.device)
            values, logs = run({n: ctx.models[n].stacked() for n in names}, ctx.batch, own, ctx.step, ctx.device)
            per_replica = {f"loss_r{k}": values[k].detach() for k in range(self.replicas)}
            return values.sum(), {**{k: v.mean() for k, v in logs.items()}, **per_replica}

        return loss

    def _hand_first_batch(self, batch: Any, device: torch.device) -> None:
        """Each task's own slice of the first micro-batch, outside vmap (`replica_first_batch`)."""
        for k, task in enumerate(self.tasks):
            if hasattr(task, "replica_first_batch"):
                task.replica_first_batch(replica_slice(batch, k), device)
        self._handed_first_batch = True

    def _replica_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every task's `replica_tensors` stacked to (K, ...), built once per device (no copy per step)."""
        if device not in self._own:
            per_task = [t.replica_tensors(device) if hasattr(t, "replica_tensors") else {} for t in self.tasks]
            keys = set(per_task[0])
            if any(set(p) != keys for p in per_task):
                raise ValueError("replicas' tasks return different replica_tensors keys")
            self._own[device] = {k: torch.stack([p[k] for p in per_task]) for k in sorted(keys)}
        return self._own[device]

    # -- run folders of the replicas --------------------------------------------------------------------

    def on_start(self, run_dir: Path, resumed: bool) -> None:
        import yaml

        first = next(iter(self.modules.values()))
        environment = run_environment(next(first.parameters()).device)
        for k, (task, out, cfg) in enumerate(zip(self.tasks, self.run_dirs, self.configs)):
            out.mkdir(parents=True, exist_ok=True)
            task.on_start(out, resumed)
            ckpt.write_text_atomic(out / "config.yaml", yaml.safe_dump(configlib.to_dict(cfg), sort_keys=False))
            meta = {**environment,
                    "replica_of": {"run": str(Path(run_dir).resolve()), "index": k, "replicas": self.replicas}}
            ckpt.write_text_atomic(out / "run.json", json.dumps(meta, indent=2))

    def on_checkpoint(self, step: int, run_dir: Any, models: Mapping[str, nn.Module]) -> dict[str, float]:
        """Each replica's own checkpoint-time work (validation, grids) in its folder, then its checkpoint
        (model and, with train.ema_decay, EMA weights), readable by every loader of single runs."""
        logs: dict[str, float] = {}
        has_ema = any(models[n] is not self.modules[n] for n in self.modules)
        keep = int(self.configs[0].train.keep_checkpoints)
        for k, (task, out) in enumerate(zip(self.tasks, self.run_dirs)):
            own = {n: m.replica(k) for n, m in models.items()}  # EMA copies when the run keeps them
            for key, value in (task.on_checkpoint(step, out, own) or {}).items():
                logs[f"{key}_r{k}"] = float(value)
            raw = {n: m.replica(k) for n, m in self.modules.items()} if has_ema else own
            state = {"replica_of": str(Path(run_dir).resolve()), "replica": k, "replicas": self.replicas}
            ckpt.save_checkpoint(out / "checkpoints", step, ckpt.module_tensors(raw), state,
                                 ema=ckpt.module_tensors(own) if has_ema else None, keep=keep,
                                 protect=self.configs[0].train.ckpt_at)
        return logs


__all__ = ["StackedModule", "ReplicaTask", "clip_per_replica_", "check_later_phases_idle", "replica_slice",
           "replica_configs", "check_replica_folders", "add_replica_options", "wants_replicas"]
