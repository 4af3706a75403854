"""Settings of the shared training loop (the `train:` section of every training config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from twostage.config import ConfigError, check


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata=check(gt=0))  # optimizer steps in total
    # Global batch: split over data-parallel ranks, then over accumulation micro-batches.
    batch_size: int = field(default=64, metadata=check(gt=0))
    grad_accum: int = field(default=1, metadata=check(gt=0))
    seed: int = 0
    # auto = bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls are slow and inexact on most CPUs).
    precision: str = field(default="auto", metadata=check(choices=("auto", "bf16", "fp32")))
    device: str = "auto"  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    compile: bool = False
    # torch.compile's mode for train.compile: "reduce-overhead" also replays each compiled module's forward and
    # backward kernels as CUDA graphs (one launch instead of hundreds: small models are launch-bound),
    # "max-autotune-no-cudagraphs" times Triton / cuDNN kernels per shape at compile time (slow to compile)
    compile_mode: str = field(default="default", metadata=check(
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"), added=True))
    # Bit-identical re-runs on one machine and software stack (twostage/engine/determinism.py): GPU kernels
    # with atomic adds (convolution and embedding backward, scatter) otherwise make two runs of one seed
    # differ as much as two seeds do (results/studies/README.md). Slower; an op without a deterministic
    # kernel raises, naming itself. Studies leave it off: their seeds sample that spread on purpose.
    deterministic: bool = field(default=False, metadata=check(added=True))
    # cuDNN autotuning of convolution algorithms (twostage/engine/determinism.py); null = on unless deterministic
    cudnn_benchmark: bool | None = field(default=None, metadata=check(added=True))
    # Data parallelism under torchrun: ddp (every rank holds the whole model, optimizer and EMA) or fsdp
    # (FSDP2: weights, gradients, optimizer state and EMA sharded over the ranks, checkpoints written
    # with torch.distributed.checkpoint plus consolidated safetensors; twostage/engine/fsdp.py). fsdp
    # also runs as a one-process world (one GPU), e.g. to resume a sharded run there.
    parallel: str = field(default="ddp", metadata=check(choices=("ddp", "fsdp"), added=True))
    ema_decay: float | None = field(default=None, metadata=check(gt=0, lt=1))
    log_every: int = field(default=50, metadata=check(gt=0))
    ckpt_every: int = field(default=1000, metadata=check(gt=0))
    keep_checkpoints: int = field(default=2, metadata=check(gt=0))
    # Extra checkpoints at these steps, never pruned: the shorter budgets of a study taken from one run
    # (`twostage generator branch`, twostage/study/branches.py).
    ckpt_at: list[int] = field(default_factory=list)
    num_workers: int = field(default=4, metadata=check(ge=0))
    # Stage-2 caches held on the GPU and batched there (no workers): true, false, or null = when the
    # cache fits (a bool, not on/off words: YAML reads `off` as false).
    data_on_device: bool | None = None
    # Stop with a clear error instead of silently training on NaN/inf (checked every log_every steps,
    # so the hot loop never waits on the GPU).
    stop_on_nonfinite: bool = True
    progress: bool = True
    # [A, B]: torch.profiler over steps A..B-1, written to RUN/profile/ (twostage/engine/profiling.py); [] = off
    profile_steps: list[int] = field(default_factory=list, metadata=check(added=True))

    @property
    def compile_options(self) -> dict:
        """Keyword arguments of torch.compile / nn.Module.compile for train.compile_mode."""
        return {} if self.compile_mode == "default" else {"mode": self.compile_mode}

    @property
    def cuda_graphs(self) -> bool:
        """Whether compiled modules replay as CUDA graphs (the trainer then marks each step's start)."""
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")

    def check(self) -> None:
        if any(s <= 0 for s in self.ckpt_at):
            raise ConfigError(f"train.ckpt_at={self.ckpt_at!r}: checkpoint steps must be positive")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"train.compile_mode={self.compile_mode} takes effect only with train.compile=true: "
                              "set train.compile=true, or leave train.compile_mode at default")
        if self.deterministic and self.cudnn_benchmark:
            raise ConfigError("train.cudnn_benchmark=true with train.deterministic=true: autotuned convolution "
                              "kernels differ between runs; leave train.cudnn_benchmark unset (null) or false")
        if self.profile_steps and (len(self.profile_steps) != 2
                                   or not 0 <= self.profile_steps[0] < self.profile_steps[1] <= self.steps):
            raise ConfigError(f"train.profile_steps={self.profile_steps!r}: give [first step, end step] within "
                              f"train.steps={self.steps}, e.g. train.profile_steps=[100,120], or [] for no profile")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )
