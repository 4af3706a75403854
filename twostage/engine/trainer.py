"""The one training loop that every trainable part of twostage goes through.

    task = SomeTask(cfg)                       # builds its modules (seed_everything first)
    train(task, cfg.train, dataset, run_dir, full_config=cfg)

The loop is linear on purpose: fetch the step's micro-batches, run each phase (forward under autocast,
backward, clip, step), update the EMA, and every `log_every` steps sync the accumulated logs (the only
host sync in steady state). Resume is automatic and exact: when `run_dir/checkpoints` has a
checkpoint, modules, EMA, optimizers, schedulers, RNG states, the data position and the task's own
state are restored and the run continues as if it had never stopped.

Config changes between a run and its resumption: twostage/engine/resume_changes.py (what is accepted,
with --resume-with-changes or always, and what is refused).

Nothing is written into the run folder before every check has passed: the config comparison above, then
reading and loading the latest checkpoint. A refused resume leaves the folder byte for byte as it was (no
run file, no TensorBoard events file). Then, in this order: `Task.on_start(run_dir, resumed)` (the task's
own run records), `config.yaml` and `run.json`, the metrics log (cut back to the resumed step), training.

A full disk (ENOSPC / EDQUOT) anywhere in a run (a checkpoint, a run file, the metrics, a task's grids or
validation records) stops it with one line (`DiskFullError`, a UserError) naming the run folder, the file
being written, the last complete checkpoint, which is kept (a failed checkpoint write removes its own
temporary folder), and the fix: free space and re-run, or move the run folder and resume it there.

`train.parallel: fsdp` (twostage/engine/fsdp.py) shards the trained modules, their gradients, optimizer states and
EMA copies over the ranks with FSDP2 instead of DDP's full copies; its checkpoints add DCP shards (`dcp/`) that the
resume reads (resharded on another world size), and rank 0 writes the consolidated weights every loader reads.

SIGTERM and SIGUSR1 stop a run at a step boundary with a checkpoint and exit 128 + the signal number
(twostage/engine/preemption.py; under torchrun at the next `log_every` step).

Every `log_every` / `ckpt_every` step the weights of the trained modules and their EMA copies are checked
for NaN/inf (one reduction per module on the device, synced together with the logs), so no checkpoint
with non-finite weights is ever written. Side work at checkpoints (`Task.on_checkpoint`: validation,
sample grids, ...) runs with the global RNGs forked, so it cannot shift the training random stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from twostage import config as configlib
from twostage.common.errors import UserError
from twostage.engine import checkpoint as ckpt
from twostage.engine import fsdp as fsdplib
from twostage.engine import determinism, preemption, profiling, resume_changes
from twostage.engine.config import TrainConfig
from twostage.engine.distributed import World, barrier, init_world, mean_across_ranks, resolve_device
from twostage.engine.ema import EMA
from twostage.engine.optim import build_optimizer, build_scheduler, match_state_layout_
from twostage.engine.replicas import clip_per_replica_
from twostage.engine.run_files import run_environment
from twostage.engine.run_log import RunLog
from twostage.engine.task import PhaseContext, Task

log = logging.getLogger(__name__)


@contextlib.contextmanager
def isolated_rng(device: torch.device):
    """Fork every global RNG (torch CPU, the CUDA `device`, numpy, python) for side work, so nothing a
    task does at a checkpoint (sampling, validation, loading a decoder) shifts the training stream and
    a resumed run stays bit-identical to an uninterrupted one."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the weights became NaN/inf; the message names the step and the way back."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(task: Task, cfg: TrainConfig, dataset, run_dir: Path, full_config: Any = None,
          resume_changes: bool = False) -> dict[str, float]:
    """Train `task` on `dataset` into `run_dir`; returns the last logged values.

    `resume_changes`: resume a run whose saved config differs from `full_config` in optimizer /
    schedule settings (see the module docstring for exactly which keys); without it such a resume is
    refused with a message naming the changed keys."""
    return _Trainer(task, cfg, dataset, Path(run_dir), full_config, resume_changes).run()


class _Trainer:
    def __init__(self, task: Task, cfg: TrainConfig, dataset, run_dir: Path, full_config: Any,
                 resume_changes: bool = False):
        from twostage.data.train_loader import build_loader

        configlib.validate(cfg, "train")
        self.task, self.cfg, self.run_dir = task, cfg, run_dir
        self.resume_changes = resume_changes
        self.changes: dict[str, list[Any]] = {}  # accepted config changes: key -> [old, new]
        self._warned_nonfinite = False
        self.fsdp = cfg.parallel == "fsdp"
        if self.fsdp:
            fsdplib.require()
        self.world: World = init_world(process_group=self.fsdp)
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
        # rank 0's unsharded CPU copies of the sharded modules, for the side work at checkpoints
        self.full_views: dict[str, nn.Module] = {}
        self.sharded: fsdplib.ShardedState | None = None
        if self.fsdp:
            self._shard()  # before the optimizers are built: fully_shard replaces the parameters
        if cfg.compile:
            for module in task.modules.values():
                module.compile(**cfg.compile_options)  # in place: state_dict keys stay unprefixed

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
        if self.fsdp:
            self.sharded = fsdplib.ShardedState(dict(task.modules), self.ema.modules if self.ema else None,
                                                self.optimizers)

        if self.world.distributed and any(p.replicas > 1 for p in self.phases):
            raise configlib.ConfigError("stacked replicas train on one device; run them without torchrun "
                                        "(or as separate runs, one per process)")
        self.loader = build_loader(dataset, batch_size=per_rank, seed=cfg.seed, num_workers=cfg.num_workers,
                                   device=self.device, rank=self.world.rank, world_size=self.world.size,
                                   on_device=cfg.data_on_device)
        self.step = 0
        self.full_config = configlib.to_dict(full_config) if full_config is not None else {"train": configlib.to_dict(cfg)}
        self.log: RunLog | None = None  # opened once every check has passed (`_start`)
        self.stop_signal: int | None = None  # a STOP_SIGNALS signal received (or, distributed, another rank's)

    # -- setup --------------------------------------------------------------------------------------

    def _shard(self) -> None:
        """FSDP2: shard every module with trainable parameters (its declared units, then itself) and its
        EMA copy the same way, so that the EMA update pairs equal local shards; frozen modules stay
        whole on every rank, as under DDP."""
        if any(p.replicas > 1 for p in self.task.phases()):
            raise configlib.ConfigError("train.parallel=fsdp cannot shard stacked replicas (they train as one "
                                        "stacked model on one device); use train.parallel=ddp for them")
        mesh = fsdplib.device_mesh(self.device)
        bf16 = self.autocast_dtype is not None and self.device.type == "cuda"
        for name, module in self.task.modules.items():
            if not any(p.requires_grad for p in module.parameters()):
                continue
            if self.world.is_main:
                self.full_views[name] = fsdplib.plain_copy(module)
            fsdplib.shard(module, mesh, bf16)
            if self.ema and name in self.ema.modules:
                fsdplib.shard(self.ema.modules[name], mesh, bf16=False)

    def _wrap_for_data_parallel(self) -> dict[str, nn.Module]:
        if not self.world.distributed or self.fsdp:  # FSDP modules are already data parallel
            return dict(self.task.modules)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return {
            name: DistributedDataParallel(m, device_ids=ids) if any(p.requires_grad for p in m.parameters()) else m
            for name, m in self.task.modules.items()
        }

    def _check_config(self) -> None:
        """Compare the run folder's saved config with the new one (resume_changes.check_changes); refuse
        what cannot be resumed and keep the accepted differences in self.changes (written to run.json
        once the resume worked)."""
        if self.world.is_main:
            self.changes = resume_changes.check_changes(self.run_dir, self.full_config, self.resume_changes)

    def _write_run_files(self) -> None:
        """config.yaml (the config being run), run.json (environment + history of accepted changes)."""
        if self.world.is_main:
            import yaml

            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "samples").mkdir(exist_ok=True)
            ckpt.write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.full_config, sort_keys=False))
            params = {n: sum(p.numel() for p in m.parameters()) for n, m in self.task.modules.items()}
            meta: dict[str, Any] = {
                **run_environment(self.device), "world_size": self.world.size, "parallel": self.cfg.parallel,
                "precision": "bf16" if self.autocast_dtype else "fp32", "parameters": params,
            }
            history = resume_changes.read_changes(self.run_dir / "run.json")
            if self.changes:
                history.append({"step": self.step, "changes": self.changes})
                log.info("resumed at step %d with config changes: %s", self.step,
                         ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.changes.items()))
            if history:
                meta["changes"] = history
            ckpt.write_text_atomic(self.run_dir / "run.json", json.dumps(meta, indent=2, default=str))
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

    def _save(self) -> dict[str, dict[str, torch.Tensor] | None] | None:
        """Write a checkpoint; under FSDP returns the gathered full weights on rank 0 ("model", "ema")."""
        if self.fsdp:
            return self._save_sharded()
        self._save_plain()
        return None

    def _gathered_rng(self) -> list[Any]:
        rng = self._rng_state()
        if self.world.distributed:  # every rank's RNG, so dropout/noise streams resume per rank
            gathered: list[Any] = [None] * self.world.size
            dist.all_gather_object(gathered, rng)
            return gathered
        return [rng]

    def _small_state(self, rng_states: list[Any]) -> dict[str, Any]:
        return {
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "rng": rng_states,
            "loader": self.loader.state_dict(),
            "task": self.task.extra_state(),
            "world_size": self.world.size,
        }

    def _save_sharded(self) -> dict[str, dict[str, torch.Tensor] | None]:
        """Every rank writes its DCP shards into the checkpoint's temporary folder (a name all ranks
        know), then rank 0 adds the consolidated weights and the small state and renames the folder
        into place: the same atomic protocol as a plain checkpoint. What rank 0 alone does is followed
        by a vote instead of a barrier, so a failure there (a full disk) stops every rank instead of
        leaving the others waiting."""
        import shutil

        folder = self.run_dir / "checkpoints"
        rng_states = self._gathered_rng()
        tmp, error = folder / f".tmp-step_{self.step:07d}-sharded", None  # begin_checkpoint's name for the tag
        if self.world.is_main:
            try:
                ckpt.begin_checkpoint(folder, self.step, tag="sharded")
            except BaseException as err:
                error = err
        self._all_ok(error, "create the checkpoint's temporary folder")
        try:
            self.sharded.save(tmp / fsdplib.DCP_DIR)
            full = {"model": self.sharded.full_tensors("model"),
                    "ema": self.sharded.full_tensors("ema") if self.ema else None}
            if self.world.is_main:
                try:
                    state = {**self._small_state(rng_states), "sharded": {"format": "dcp", "dir": fsdplib.DCP_DIR}}
                    ckpt.save_checkpoint(folder, self.step, full["model"], state, ema=full["ema"],
                                         keep=self.cfg.keep_checkpoints, protect=self.cfg.ckpt_at, tmp=tmp)
                except BaseException as err:
                    error = err
            self._all_ok(error, f"write checkpoint step {self.step}")
        except BaseException:
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return full

    def _all_ok(self, error: BaseException | None, what: str) -> None:
        """A collective: raise `error` on rank 0 and a pointer to it on the others when rank 0 failed."""
        failed = torch.tensor(0.0 if error is None else 1.0, device=self.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError(f"rank 0 failed to {what}; its error is in its log")

    def _save_plain(self) -> None:
        rng_states = self._gathered_rng()
        if self.world.is_main:
            state = {"optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                     **self._small_state(rng_states)}
            ema = ckpt.module_tensors(self.ema.modules) if self.ema else None
            ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step, ckpt.module_tensors(self.task.modules),
                                 state, ema=ema, keep=self.cfg.keep_checkpoints,
                                 protect=self.cfg.ckpt_at)
        barrier(self.world)

    def _resume(self) -> bool:
        """Load the latest checkpoint, if any (whether there was one); writes nothing."""
        path = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            seed_everything(self.cfg.seed + self.world.rank)  # per-rank streams for dropout / noise
            return False
        if self.fsdp:
            step, state = ckpt.load_state(path)
            if "sharded" not in state:
                raise ckpt.CheckpointError(_not_sharded_message(path, state))
            if self.ema and not (path / "ema.safetensors").is_file():
                raise ckpt.CheckpointError(f"{path} has no EMA weights but train.ema_decay is set")
            self.sharded.load(path / state["sharded"]["dir"])  # resharded to this world size by DCP
        else:
            step, model, state, ema = ckpt.load_checkpoint(path)
            if "sharded" in state:
                raise ckpt.CheckpointError(
                    f"{path} was written by an FSDP run (train.parallel=fsdp): resume it with train.parallel=fsdp, "
                    f"or load its consolidated weights ({path}/model.safetensors) into a new run")
            if "optimizers" not in state:
                raise ckpt.CheckpointError(_weights_only_message(path, state))
            ckpt.load_module_tensors(self.task.modules, {k: v.to(self.device) for k, v in model.items()})
            if self.ema:
                if ema is None:
                    raise ckpt.CheckpointError(f"{path} has no EMA weights but train.ema_decay is set")
                ckpt.load_module_tensors(self.ema.modules, {k: v.to(self.device) for k, v in ema.items()})
            for name, opt in self.optimizers.items():
                opt.load_state_dict(resume_changes.with_hyperparameters(state["optimizers"][name], opt))
                match_state_layout_(opt)
        for name, sched in self.schedulers.items():
            resume_changes.load_schedule(sched, state["schedulers"][name])
        if state["world_size"] != self.world.size:
            if self.fsdp:
                # DCP reshards weights and optimizer state; the loader position (batches of the epoch)
                # carries over, and an unchanged global batch holds the same samples (the sampler deals
                # one permutation round-robin), but per-rank random streams (dropout, noise) differ.
                log.warning("resuming a %d-process FSDP run with %d processes: weights and optimizer state are "
                            "resharded; the random streams per rank differ, so the run is not bit-identical",
                            state["world_size"], self.world.size)
            else:
                log.warning("resuming a %d-process run with %d processes: the data order will differ",
                            state["world_size"], self.world.size)
        rng = state["rng"]
        self._set_rng_state(rng[self.world.rank] if self.world.rank < len(rng) else rng[0])
        self.loader.load_state_dict(state["loader"])
        self.task.load_extra_state(state["task"])
        self.step = step
        if self.world.is_main:
            log.info("resumed from %s (step %d)", path, step)
        return True

    def _side_work_models(self, full: dict[str, dict[str, torch.Tensor] | None] | None) -> dict[str, nn.Module]:
        """What `Task.on_checkpoint` gets (rank 0): the EMA copy of each module that has one, else the
        module. Under FSDP the sharded ones cannot run on rank 0 alone, so they are rank 0's unsharded
        copies loaded with the weights just gathered for the consolidated checkpoint files."""
        models = {n: (self.ema.modules.get(n) if self.ema else None) or m for n, m in self.task.modules.items()}
        for name, view in self.full_views.items():
            from_ema = self.ema is not None and name in self.ema.modules
            ckpt.load_module_tensors({name: view}, full["ema" if from_ema else "model"])
            models[name] = view.to(self.device).eval() if from_ema else view.to(self.device)
        return models

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

    def _next_batch(self) -> Any:
        return self._to_device(preemption.fetch_shielded(self.loader))

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
            loss = loss.detach().float() / phase.replicas  # the replicas' mean loss
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
                if phase.replicas > 1:
                    norm = clip_per_replica_(params, clip, phase.replicas).mean()
                else:
                    norm = fsdplib.full(torch.nn.utils.clip_grad_norm_(params, clip))  # FSDP: a DTensor
                key = f"{opt_name}/grad_norm"
                sums[key] = sums.get(key, 0.0) + norm.detach().float()
                counts[key] = counts.get(key, 0) + 1
            opt.step()
            self.schedulers[opt_name].step()
        if multi_phase:
            for module in self.task.modules.values():
                module.requires_grad_(True)
        return first_bad

    def _checked_weights(self) -> list[tuple[str, list[torch.Tensor]]]:
        """(name, parameters) of every trained module and of every EMA copy ("ema:<name>")."""
        trained = {m for spec in self.specs.values() for m in spec.modules}
        # FSDP: each rank checks its own shards; the flags are max-reduced over the ranks.
        groups = [(n, [fsdplib.local(p.detach()) for p in m.parameters()])
                  for n, m in self.task.modules.items() if n in trained]
        if self.ema:
            groups += [(f"ema:{n}", [fsdplib.local(p.detach()) for p in m.parameters()])
                       for n, m in self.ema.modules.items()]
        return [(n, ps) for n, ps in groups if ps]

    def _nonfinite_weight_flags(self, groups: list[tuple[str, list[torch.Tensor]]]) -> list[torch.Tensor]:
        """One device scalar per group, 1.0 when any of its weights is NaN/inf: a fused L1 norm per dtype
        (a sum, so a NaN or inf always reaches it; it overflows only for weights no run survives), and
        no host sync."""
        flags = []
        for _, params in groups:
            by_kind: dict[tuple, list[torch.Tensor]] = {}
            for p in params:
                by_kind.setdefault((p.device, p.dtype), []).append(p)
            norms = [torch.stack(_abs_sums(ts)).float().to(self.device) for ts in by_kind.values()]
            flags.append((~torch.isfinite(torch.cat(norms)).all()).to(torch.float64))
        return flags

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        """Stop (on every rank) when the loss since the last check or any weight is NaN/inf. The one host
        sync happens at log/checkpoint steps only, before a checkpoint is written."""
        groups = self._checked_weights()
        packed = torch.stack([first_bad.to(device=self.device, dtype=torch.float64).reshape(()),
                              *self._nonfinite_weight_flags(groups)])
        if self.world.distributed:  # every rank must stop together
            dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        values = packed.tolist()
        bad_step, bad_weights = int(values[0]), [n for (n, _), v in zip(groups, values[1:]) if v > 0]
        if bad_step < 0 and not bad_weights:
            return
        if not self.cfg.stop_on_nonfinite:
            if not self._warned_nonfinite and self.world.is_main:
                log.warning("non-finite loss or weights by step %d; training on (train.stop_on_nonfinite=false)",
                            self.step)
            self._warned_nonfinite = True
            return
        raise NonFiniteLossError(self._nonfinite_message(bad_step, bad_weights))

    def _nonfinite_message(self, bad_step: int, bad_weights: list[str]) -> str:
        if bad_step >= 0:
            what = f"the loss became non-finite (NaN/inf) at step {bad_step}"
        else:
            what = (f"the weights of {', '.join(bad_weights)} became non-finite (NaN/inf) by step {self.step} "
                    "while the loss still looked finite")
        trained = {m for spec in self.specs.values() for m in spec.modules}
        model_keys = {f"{n}.{k}" for n, m in self.task.modules.items() if n in trained for k, _ in m.named_parameters()}
        ema_keys = ({f"{n}.{k}" for n, m in self.ema.modules.items() for k, _ in m.named_parameters()}
                    if self.ema else None)
        good, bad = ckpt.last_finite_checkpoint(self.run_dir / "checkpoints", model_keys, ema_keys)
        if good is not None:
            where = f"the last good checkpoint (finite weights) is {good}"
            if bad:
                where += (f"; delete the newer {', '.join(p.name for p in bad)} first (non-finite or unreadable "
                          "weights), so that the run resumes from it")
        else:
            where = "no checkpoint with finite weights was written before it"
        flat = configlib.flatten(self.full_config)
        lr_keys = [k for k in flat if k.split(".")[-1] == "lr" and "optim" in k.split(".")[:-1]]
        lower = (f"lower the learning rate ({', '.join(f'{k}={flat[k]!r}' for k in lr_keys[:4])})" if lr_keys
                 else "lower the learning rate")
        then = (f"it resumes from {good.name} with the new optimizer settings" if good is not None
                else "the run starts over in this folder (or train into a new --out folder)")
        flag = resume_changes.RESUME_FLAG
        return (f"{what}; training stopped at step {self.step} without saving, and {where}. To continue, {lower} "
                f"(or raise the warmup, or set a gradient clip) and re-run the same command with {flag} "
                f"(resume_changes=True in Python): {then}.")

    def run(self) -> dict[str, float]:
        try:
            last = self._train()
        except BaseException as err:
            self._close(quiet=True)
            if ckpt.is_disk_full(err):
                raise ckpt.DiskFullError(self._disk_full_message(err), ckpt.os_error_code(err)) from err
            raise
        self._close()
        if self.stop_signal is not None:
            if self.world.is_main:
                log.warning("%s: training stopped at step %d with a checkpoint there; re-running the same command "
                            "resumes from it", signal.Signals(self.stop_signal).name, self.step)
            raise SystemExit(128 + self.stop_signal)
        return last

    def _start(self) -> None:
        """Checks first, writes after: see the module docstring."""
        self._check_config()
        resumed = self._resume()
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.world)
        self.task.on_start(self.run_dir, resumed)
        self._write_run_files()
        self.log = RunLog(self.run_dir, enabled=self.world.is_main)
        self.log.truncate_after(self.step)  # a resumed run (or one restarted after a kill) keeps one history

    def _close(self, quiet: bool = False) -> None:
        """Stop the loader's workers and close the log; `quiet` (on the way out of an error) ignores what
        closing raises, so the error that stopped the run is the one reported."""
        for close in (self.loader.close, self.log.close if self.log is not None else None):
            if close is None:
                continue
            if quiet:
                with contextlib.suppress(Exception):
                    close()
            else:
                close()

    def _disk_full_message(self, err: BaseException) -> str:
        code = ckpt.os_error_code(err)
        reason = getattr(err, "strerror", None) or (os.strerror(code) if code else str(err))
        filename = getattr(err, "filename", None)
        writing = f" writing {filename}" if filename else ""
        last = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        if last is not None:
            kept = f"the last complete checkpoint {last} is intact, and re-running the same command resumes from it"
            elsewhere = f"or move {self.run_dir} to a disk with space and re-run with that folder as --out"
        else:
            kept = "no checkpoint had been written yet, so re-running the same command starts the run over"
            elsewhere = "or re-run with a new --out folder on a disk with space"
        return (f"no space left on the device of {self.run_dir} ({reason}{writing}) at step {self.step}; {kept}. "
                f"Free some space (or lower train.keep_checkpoints) and re-run the same command, {elsewhere}")

    def _train(self) -> dict[str, float]:
        def record(signum: int) -> None:
            self.stop_signal = signum

        cfg = self.cfg
        with preemption.stop_signals(record), determinism.kernel_settings(cfg.deterministic, cfg.cudnn_benchmark), \
                profiling.profiled_steps(cfg.profile_steps, self.run_dir, self.device,
                                         enabled=self.world.is_main) as self.profiler:
            return self._loop()

    def _loop(self) -> dict[str, float]:
        self._start()
        cfg, accum = self.cfg, self.cfg.grad_accum
        images_per_step = cfg.batch_size
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        first_bad = torch.tensor(-1, device=self.device)
        last: dict[str, float] = {}
        bar = _progress(self.cfg, self.step, self.world)
        window_start, window_steps, paused = time.perf_counter(), 0, 0.0
        while self.step < cfg.steps:
            self.profiler.begin(self.step)
            if cfg.cuda_graphs and self.device.type == "cuda":
                # a new step: the previous step's graph outputs may be overwritten (torch.compile CUDA graph trees)
                torch.compiler.cudagraph_mark_step_begin()
            micro_batches = [self._next_batch() for _ in range(accum)]
            scratches: list[dict] = [{} for _ in range(accum)]
            for phase in self.phases:
                if phase.active(self.step):
                    first_bad = self._run_phase(phase, micro_batches, scratches, sums, counts, first_bad)
            if self.ema:
                self.ema.update()
            self.step += 1
            window_steps += 1
            self.profiler.end(self.step)
            if bar is not None:
                bar.update(1)
            do_log = self.step % cfg.log_every == 0 or self.step == cfg.steps
            do_ckpt = self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or self.step in cfg.ckpt_at
            if do_log or do_ckpt:
                self._check_finite(first_bad)  # before anything is logged or saved
            stop = False
            if do_log:
                keys = sorted(sums)
                packed = [sums[k] for k in keys]
                if self.world.distributed:  # the stop request rides along, so that every rank stops at this step
                    packed.append(torch.full((), float(self.stop_signal is not None), device=self.device))
                values = mean_across_ranks(torch.stack(packed), self.world).tolist() if packed else []
                if self.world.distributed:
                    stop = values.pop() > 0
                elapsed = time.perf_counter() - window_start - paused
                last = {k: v / counts[k] for k, v in zip(keys, values)}
                last.update({f"lr/{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()})
                last["perf/step_time_s"] = elapsed / window_steps
                if self.device.type == "cuda":  # rank 0's peak: what sharding saves (a host counter, no sync)
                    last["perf/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                last["perf/images_per_s"] = images_per_step * window_steps / elapsed
                last["perf/images_seen"] = float(self.step * images_per_step)
                self.log.write(self.step, last)
                if bar is not None:
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in last.items() if k.endswith("/loss")}
                                    | {"img/s": f"{last['perf/images_per_s']:.0f}"})
                sums, counts = {}, {}
                window_start, window_steps, paused = time.perf_counter(), 0, 0.0
            if do_ckpt:
                pause_start = time.perf_counter()
                full = self._save()
                if self.world.is_main:
                    models = self._side_work_models(full)
                    # side work must not draw from the training RNG; it runs the modules eagerly (a module
                    # compiled in place, train.compile, would otherwise be recompiled for eval mode, no-grad
                    # and every new batch shape of validation and previews: tests/test_tokenizer_val_curve.py);
                    # and it does not autotune cuDNN for its one-off shapes. The study's compiled tokenizers
                    # on an H200 paused 48-131 s at their first checkpoint (results/study_crt_seeds345) and,
                    # with the eager stance alone, still 53-72 s (results/study_tokens, bench_study.txt;
                    # later checkpoints ~2 s): a one-time cost per process that only GPU runs pay
                    with isolated_rng(self.device), torch.compiler.set_stance("force_eager"), \
                            determinism.without_autotuning():
                        extra = self.task.on_checkpoint(self.step, self.run_dir, models)
                        for module in self.task.modules.values():
                            module.train()
                        if extra:
                            self.log.write(self.step, {k: float(v) for k, v in extra.items()})
                            last.update({k: float(v) for k, v in extra.items()})
                    for view in self.full_views.values():
                        view.cpu()  # give the device memory back to training
                barrier(self.world)
                paused += time.perf_counter() - pause_start  # checkpoint time is not training throughput
            if not self.world.distributed:  # a Python flag: checked every step, no sync
                stop = self.stop_signal is not None
            if stop:
                if not do_ckpt:  # else the checkpoint just written is the one to resume from
                    if not do_log:
                        self._check_finite(first_bad)  # as before every checkpoint
                    self._save()  # without the side work: the kill is coming
                # A rank that got no signal itself stops because another one did: the job is being stopped.
                self.stop_signal = self.stop_signal or signal.SIGTERM
                break
        if bar is not None:
            bar.close()
        return last


def _progress(cfg: TrainConfig, start: int, world: World):
    if not (cfg.progress and world.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)


def _weights_only_message(path: Path, state: dict[str, Any]) -> str:
    """Why a checkpoint without optimizer state cannot be resumed, and what to do instead, by its origin."""
    if "replica_of" in state:
        return (f"{path} is replica {state.get('replica')} of the joint run {state['replica_of']} (K replicas trained "
                "as one): it holds weights only. Resume the joint run (the same `generator train` command with "
                "all its --out folders and --pack), or train into a new --out folder.")
    if "converted_from" in state:
        origin = state["converted_from"].get("format", "another format")
        return (f"{path} holds converted weights ({origin}, `twostage convert`) without an optimizer state, so "
                "there is no run to resume in this folder; train into a new --out folder.")
    return (f"{path} holds weights without an optimizer state, so there is no run to resume in this folder; "
            "train into a new --out folder.")


def _not_sharded_message(path: Path, state: dict[str, Any]) -> str:
    if "optimizers" in state:
        return (f"{path} was written by a run without FSDP (train.parallel=ddp): resume it with train.parallel=ddp, "
                "or train into a new --out folder")
    return _weights_only_message(path, state)


def _abs_sums(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """sum |x| of each tensor (NaN/inf when it holds one): one fused kernel where torch has it."""
    foreach_norm = getattr(torch, "_foreach_norm", None)
    if foreach_norm is not None:
        try:
            return list(foreach_norm(tensors, ord=1))
        except (RuntimeError, TypeError):  # no foreach support for these tensors: per tensor below
            pass
    return [torch.linalg.vector_norm(t, ord=1) for t in tensors]
