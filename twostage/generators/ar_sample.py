"""Fast class-conditional sampling from an AR transformer: static KV cache, CFG, compiled steps.

    sampler = ARSampler(model, batch_size=64, cfg_scale=2.0, compile=True)
    tokens = sampler.sample(labels, seed=0)         # (N, h, w) int64 on the model's device

Per batch: the class prefix is prefilled (conditional rows first, the null class second when CFG is
on, so the batch is doubled), then one token per step. A step is one function (embed, all blocks
against the cache, head, CFG, temperature / top-k / top-p, Gumbel-max draw) that torch.compile turns
into a few fused kernels and, with mode "reduce-overhead", one CUDA graph replay: no host syncs and
no per-kernel launch cost. The shapes are static: the last batch is padded, the cache is allocated at
its final size, and each step reads the cache prefix of its bucket length (see kv_cache.py).

Reproducibility: the noise of batch b comes from a generator seeded with (seed, b), so the same
seed, batch size and settings give the same tokens, independent of how many batches ran before.
"""

from __future__ import annotations

import logging

import torch

from twostage.generators.ar_model import PREFIX, ARTransformer
from twostage.generators.kv_cache import bucket_length
from twostage.generators.sampling import guided_step

log = logging.getLogger(__name__)


def _raise_recompile_limit(n: int) -> None:
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), n))


class ARSampler:
    def __init__(self, model: ARTransformer, *, batch_size: int = 64, cfg_scale: float = 2.0,
                 cfg_until: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 kv_bucket: int = 32, compile: bool = False, compile_mode: str = "reduce-overhead",
                 dtype: torch.dtype | None = None):
        """cfg_scale <= 0 or None samples without guidance (no doubled batch). cfg_until: guided
        steps are 0..cfg_until-1 (step 0 draws z_0); later steps use the conditional logits only.
        dtype: the cache dtype (default: the model's)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        self.model = model.eval()
        self.batch = batch_size
        self.cfg_scale = cfg_scale if cfg_scale and cfg_scale > 0 else None
        self.cfg_until = cfg_until
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.kv_bucket = kv_bucket
        self.dtype = dtype
        self.rows = 2 * batch_size if self.cfg_scale is not None else batch_size
        self.compiled = compile
        self.cudagraphs = compile and compile_mode == "reduce-overhead"
        self._step = self._decode_step
        if compile:
            # one graph per (bucket length, guided) pair; dynamic=False keeps every shape static so
            # each can be a CUDA graph
            _raise_recompile_limit(4 * (model.seq_len // max(kv_bucket, 1) + 2))
            self._step = torch.compile(self._decode_step, mode=compile_mode, dynamic=False, fullgraph=True)

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def _guided(self, step: int) -> bool:
        return self.cfg_scale is not None and (self.cfg_until is None or step < self.cfg_until)

    def _next(self, logits: torch.Tensor, noise: torch.Tensor | None, guided: bool) -> torch.Tensor:
        if self.cfg_scale is not None and not guided:
            logits = logits[: self.batch]  # CFG switched off: conditional rows only
        return guided_step(logits, noise, batch=self.batch, cfg_scale=self.cfg_scale if guided else None,
                           temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def _decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_positions: torch.Tensor,
                     noise: torch.Tensor | None, guided: bool, record: bool = False):
        fed = torch.cat([tokens, tokens]) if self.cfg_scale is not None else tokens
        logits = self.model.decode(fed, pos, kv_positions)
        nxt = self._next(logits, noise, guided)
        return nxt, (logits[: self.batch].float() if record else None)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seed: int = 0, return_logits: bool = False, first_batch: int = 0):
        """Tokens (n, h, w) int64 for class labels (n,). With return_logits also the conditional
        logits (n, N, V) float32 each token was drawn from (before CFG and filtering; for tests).

        Batch b of this call draws its noise from seed (seed, first_batch + b): sampling a long
        label list in several calls gives the same tokens as in one call.
        """
        labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.model.num_classes):
            raise ValueError(f"labels must lie in [0, {self.model.num_classes}] ({self.model.num_classes} = null class)")
        outs, logit_outs = [], []
        if not self.model.has_caches(self.rows, self.dtype):
            self.model.setup_caches(self.rows, self.dtype)
        try:
            for b, start in enumerate(range(0, len(labels), self.batch)):
                chunk = labels[start : start + self.batch]
                tokens, logits = self._sample_batch(chunk, seed, first_batch + b, return_logits)
                outs.append(tokens[: len(chunk)])
                if return_logits:
                    logit_outs.append(logits[: len(chunk)])
        finally:
            # A compiled sampler keeps its cache: CUDA graphs recorded against these buffers stay
            # valid for the next call. Call release() to free it.
            if not self.compiled:
                self.release()
        h, w = self.model.grid
        tokens = torch.cat(outs).view(-1, h, w) if outs else torch.empty(0, h, w, dtype=torch.int64)
        return (tokens, torch.cat(logit_outs)) if return_logits else tokens

    def release(self) -> None:
        """Free the KV cache (it is rebuilt by the next sample call)."""
        self.model.clear_caches()

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids and the noise buffer, allocated once per sampler: a compiled step sees the
        same tensors every call (the noise buffer is marked static so CUDA graphs read it in place
        instead of copying 4 bytes x vocab x batch each step)."""
        if getattr(self, "_positions", None) is None or self._positions.device != self.device:
            self._positions = torch.arange(self.model.seq_len, device=self.device)
            self._noise = None
            if self.temperature > 0:
                self._noise = torch.empty(self.batch, self.model.vocab_size, device=self.device)
                if self.cudagraphs:
                    torch._dynamo.mark_static_address(self._noise)
        return self._positions, self._noise

    def _sample_batch(self, labels: torch.Tensor, seed: int, batch_index: int, record: bool):
        model, n_tok, B, dev = self.model, self.model.num_tokens, self.batch, self.device
        if len(labels) < B:  # pad to the static batch; padded rows are dropped by the caller
            labels = torch.cat([labels, labels.new_zeros(B - len(labels))])
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed) * 1_000_003 + batch_index)
        positions, noise_buf = self._buffers()

        def noise():  # Exp(1) draws for the Gumbel-max sample, in place
            return None if noise_buf is None else noise_buf.exponential_(generator=gen)

        # Token t of every sequence is written into row t: each row is a contiguous buffer of ours
        # (not memory owned by a CUDA graph) that the next step reads as its input.
        out = torch.empty(n_tok, B, dtype=torch.int64, device=dev)
        logits_rec = torch.empty(n_tok, B, model.vocab_size, device=dev) if record else None
        fed_labels = labels
        if self.cfg_scale is not None:
            fed_labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
        first = model.prefill(fed_labels)
        out[0] = self._next(first, noise(), self._guided(0))
        if record:
            logits_rec[0] = first[:B].float()
        for t in range(1, n_tok):
            pos = PREFIX + t - 1  # sequence position of the token fed (z_{t-1})
            kv = positions[: bucket_length(pos + 1, self.kv_bucket, model.seq_len)]
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            nxt, logits = self._step(out[t - 1], positions[pos], kv, noise(), self._guided(t), record)
            out[t].copy_(nxt)
            if record:
                logits_rec[t] = logits
        tokens = out.t().contiguous()
        return tokens, (logits_rec.transpose(0, 1) if record else None)
