"""The one training loop that every trainable part of twostage goes through.

    task = SomeTask(cfg)                       # builds its modules (seed_everything first)
    train(task, cfg.train, dataset, run_dir, full_config=cfg)

The loop is linear on purpose: fetch the step's micro-batches, run each phase (forward under autocast,
backward, clip, step), update the EMA, and every `log_every` steps sync the accumulated logs (the only
host sync in steady state). Resume is automatic and exact: when `run_dir/checkpoints` has a
checkpoint, modules, EMA, optimizers, schedulers, RNG states, the data position and the task's own
state are restored and the run continues as if it had never stopped.
"""

from __future__ import annotations

from twostage.common.errors import UserError

import contextlib
import json
import logging
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import twostage
from twostage import config as configlib
from twostage.engine import checkpoint as ckpt
from twostage.engine.config import TrainConfig
from twostage.engine.distributed import World, barrier, init_world, mean_across_ranks, resolve_device
from twostage.engine.ema import EMA
from twostage.engine.optim import build_optimizer, build_scheduler
from twostage.engine.run_log import RunLog
from twostage.engine.task import PhaseContext, Task

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without breaking exactness.
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                     "train.progress", "train.num_workers", "train.compile"}


class NonFiniteLossError(UserError, RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(task: Task, cfg: TrainConfig, dataset, run_dir: Path, full_config: Any = None) -> dict[str, float]:
    """Train `task` on `dataset` into `run_dir`; returns the last logged values."""
    return _Trainer(task, cfg, dataset, Path(run_dir), full_config).run()


class _Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, dataset, run_dir: Path, full_config: Any):
        from twostage.data.loader import ResumableLoader

        configlib.validate(cfg, "train")
        self.task, self.cfg, self.run_dir = task, cfg, run_dir
        self.world: World = init_world()
        self.device = resolve_device(cfg.device, self.world)
        per_rank, rest = divmod(cfg.batch_size, self.world.size * cfg.grad_accum)
        if rest or per_rank == 0:
            raise configlib.ConfigError(
                f"train.batch_size={cfg.batch_size} must be a positive multiple of world size "
                f"({self.world.size}) x train.grad_accum ({cfg.grad_accum})"
            )
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        for module in task.modules.values():
            module.to(self.device).train()
        ema_names = task.ema_modules() if cfg.ema_decay else []
        self.ema = EMA({n: task.modules[n] for n in ema_names}, cfg.ema_decay) if ema_names else None
        if cfg.compile:
            for module in task.modules.values():
                module.compile()  # in place: state_dict keys stay unprefixed

        specs = task.optimizers()
        self.optimizers = {
            name: build_optimizer([task.modules[m] for m in spec.modules], spec.config, self.device)
            for name, spec in specs.items()
        }
        self.schedulers = {
            name: build_scheduler(opt, specs[name].config, cfg.steps) for name, opt in self.optimizers.items()
        }
        self.specs = specs
        self.phases = task.phases()
        self.wrapped = self._wrap_for_data_parallel()

        self.loader = ResumableLoader(
            dataset, batch_size=per_rank, seed=cfg.seed, num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda", rank=self.world.rank, world_size=self.world.size,
        )
        self.step = 0
        self.full_config = configlib.to_dict(full_config) if full_config is not None else {"train": configlib.to_dict(cfg)}
        self.log = RunLog(run_dir, enabled=self.world.is_main)

    # -- setup --------------------------------------------------------------------------------------

    def _wrap_for_data_parallel(self) -> dict[str, nn.Module]:
        if not self.world.distributed:
            return dict(self.task.modules)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return {
            name: DistributedDataParallel(m, device_ids=ids) if any(p.requires_grad for p in m.parameters()) else m
            for name, m in self.task.modules.items()
        }

    def _prepare_run_dir(self) -> None:
        saved = self.run_dir / "config.yaml"
        if saved.is_file() and self.world.is_main:
            import yaml

            old = _flatten(yaml.safe_load(saved.read_text()) or {})
            new = _flatten(self.full_config)
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
            if changed:
                details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
                raise configlib.ConfigError(
                    f"{self.run_dir} holds a run with a different config ({details}). "
                    "Resume with the same config, or train into a new --out folder."
                )
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "samples").mkdir(exist_ok=True)
            import yaml

            saved.write_text(yaml.safe_dump(self.full_config, sort_keys=False))
            params = {n: sum(p.numel() for p in m.parameters()) for n, m in self.task.modules.items()}
            meta = {
                "twostage": twostage.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "device": str(self.device), "device_name": _device_name(self.device), "world_size": self.world.size,
                "precision": "bf16" if self.autocast_dtype else "fp32", "parameters": params,
            }
            (self.run_dir / "run.json").write_text(json.dumps(meta, indent=2))
        barrier(self.world)

    # -- checkpoints ---------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(legacy=False), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def _save(self) -> None:
        rng = self._rng_state()
        if self.world.distributed:  # every rank's RNG, so dropout/noise streams resume per rank
            gathered: list[Any] = [None] * self.world.size
            dist.all_gather_object(gathered, rng)
            rng_states = gathered
        else:
            rng_states = [rng]
        if self.world.is_main:
            state = {
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                "rng": rng_states,
                "loader": self.loader.state_dict(),
                "task": self.task.extra_state(),
                "world_size": self.world.size,
            }
            ema = ckpt.module_tensors(self.ema.modules) if self.ema else None
            ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, ckpt.module_tensors(self.task.modules),
                                 state, ema=ema, keep=self.cfg.keep_checkpoints)
        barrier(self.world)

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            seed_everything(self.cfg.seed + self.world.rank)  # per-rank streams for dropout / noise
            return
        step, model, state, ema = ckpt.load_checkpoint(path)
        ckpt.load_module_tensors(self.task.modules, {k: v.to(self.device) for k, v in model.items()})
        if self.ema:
            if ema is None:
                raise ckpt.CheckpointError(f"{path} has no EMA weights but train.ema_decay is set")
            ckpt.load_module_tensors(self.ema.modules, {k: v.to(self.device) for k, v in ema.items()})
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        if state["world_size"] != self.world.size:
            log.warning("resuming a %d-process run with %d processes: the data order will differ",
                        state["world_size"], self.world.size)
        rng = state["rng"]
        self._set_rng_state(rng[self.world.rank] if self.world.rank < len(rng) else rng[0])
        self.loader.load_state_dict(state["loader"])
        self.task.load_extra_state(state["task"])
        self.step = step
        self.log.truncate_after(step)
        if self.world.is_main:
            log.info("resumed from %s (step %d)", path, step)

    # -- the loop ------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    def _run_phase(self, phase, micro_batches, scratches, sums, counts, first_bad) -> torch.Tensor:
        trained = {m for opt in phase.optimizers for m in self.specs[opt].modules}
        multi_phase = len(self.phases) > 1
        if multi_phase:  # gradients reach only what this phase updates
            for name, module in self.task.modules.items():
                module.requires_grad_(name in trained)
        models = {n: (self.wrapped[n] if n in trained else m) for n, m in self.task.modules.items()}
        for opt in phase.optimizers:
            self.optimizers[opt].zero_grad(set_to_none=True)
        accum = len(micro_batches)
        for i, (batch, scratch) in enumerate(zip(micro_batches, scratches)):
            sync = contextlib.ExitStack()
            if i < accum - 1:
                for n in trained:
                    if isinstance(models[n], DistributedDataParallel):
                        sync.enter_context(models[n].no_sync())
            with sync:
                with self._autocast():
                    loss, logs = phase.loss(PhaseContext(batch, self.step, models, scratch, self.device))
                (loss / accum).backward()
            loss = loss.detach().float()
            first_bad = torch.where(~torch.isfinite(loss) & (first_bad < 0), self.step, first_bad)
            for key, value in {"loss": loss, **logs}.items():
                key = f"{phase.name}/{key}"
                # A Python number becomes a fill kernel on the device (its value is a launch argument),
                # not a host->device copy, so logging never stalls the step.
                value = (value.detach().float().to(self.device) if isinstance(value, torch.Tensor)
                         else torch.full((), float(value), device=self.device))
                sums[key] = sums.get(key, 0.0) + value / accum
                counts[key] = counts.get(key, 0) + (1 if i == 0 else 0)
        for opt_name in phase.optimizers:
            opt, clip = self.optimizers[opt_name], self.specs[opt_name].config.grad_clip
            if clip is not None:
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                key = f"{opt_name}/grad_norm"
                sums[key] = sums.get(key, 0.0) + norm.detach().float()
                counts[key] = counts.get(key, 0) + 1
            opt.step()
            self.schedulers[opt_name].step()
        if multi_phase:
            for module in self.task.modules.values():
                module.requires_grad_(True)
        return first_bad

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        bad = int(first_bad.item())
        if self.world.distributed:  # every rank must stop together
            flag = torch.tensor([bad], device=self.device, dtype=torch.float64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bad = int(flag.item())
        if bad >= 0 and self.cfg.stop_on_nonfinite:
            last = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
            raise NonFiniteLossError(
                f"the loss became non-finite (NaN/inf) at step {bad}; training stopped and {where}. "
                "Lower the learning rate or raise the warmup, then resume from that checkpoint."
            )

    def run(self) -> dict[str, float]:
        self._prepare_run_dir()
        self._resume()
        cfg, accum = self.cfg, self.cfg.grad_accum
        images_per_step = cfg.batch_size
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        first_bad = torch.tensor(-1, device=self.device)
        last: dict[str, float] = {}
        bar = _progress(self.cfg, self.step, self.world)
        window_start, window_steps, paused = time.perf_counter(), 0, 0.0
        while self.step < cfg.steps:
            micro_batches = [self._to_device(next(self.loader)) for _ in range(accum)]
            scratches: list[dict] = [{} for _ in range(accum)]
            for phase in self.phases:
                if phase.active(self.step):
                    first_bad = self._run_phase(phase, micro_batches, scratches, sums, counts, first_bad)
            if self.ema:
                self.ema.update()
            self.step += 1
            window_steps += 1
            if bar is not None:
                bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._check_finite(first_bad)
                keys = sorted(sums)
                values = mean_across_ranks(torch.stack([sums[k] for k in keys]), self.world).tolist() if keys else []
                elapsed = time.perf_counter() - window_start - paused
                last = {k: v / counts[k] for k, v in zip(keys, values)}
                last.update({f"lr/{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()})
                last["perf/step_time_s"] = elapsed / window_steps
                last["perf/images_per_s"] = images_per_step * window_steps / elapsed
                last["perf/images_seen"] = float(self.step * images_per_step)
                self.log.write(self.step, last)
                if bar is not None:
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in last.items() if k.endswith("/loss")}
                                    | {"img/s": f"{last['perf/images_per_s']:.0f}"})
                sums, counts = {}, {}
                window_start, window_steps, paused = time.perf_counter(), 0, 0.0
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                pause_start = time.perf_counter()
                self._check_finite(first_bad)
                self._save()
                if self.world.is_main:
                    models = {n: (self.ema.modules.get(n) if self.ema else None) or m for n, m in self.task.modules.items()}
                    extra = self.task.on_checkpoint(self.step, self.run_dir, models)
                    for module in self.task.modules.values():
                        module.train()
                    if extra:
                        self.log.write(self.step, {k: float(v) for k, v in extra.items()})
                        last.update({k: float(v) for k, v in extra.items()})
                barrier(self.world)
                paused += time.perf_counter() - pause_start  # checkpoint time is not training throughput
        if bar is not None:
            bar.close()
        self.loader.close()
        self.log.close()
        return last


def _progress(cfg: TrainConfig, start: int, world: World):
    if not (cfg.progress and world.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
