"""Fast class-conditional sampling from an AR transformer: static KV cache, CFG, CUDA graphs.

    sampler = ARSampler(model, batch_size=64, cfg_scale=2.0, compile=True)
    tokens = sampler.sample(labels, seed=0)         # (N, h, w) int64 on the model's device

Per batch: the class prefix is prefilled (conditional rows first, the null class second when
guidance is on, i.e. cfg_scale != 1, so the batch is doubled), then one token per step. A step is
one function (embed, all blocks against the cache, head, CFG, temperature / top-k / top-p,
Gumbel-max draw). On a GPU it is compiled (fused kernels) and captured as a CUDA graph per
cache-bucket length that reads the position from a device tensor, writes the token into the output
buffer and advances the position itself: a step then costs the host one noise launch and one graph
replay, with no host sync and no per-kernel launch cost. (torch.compile's own "reduce-overhead"
graphs were measured slower: their per-call guard and input checks cost ~0.5 ms of host time per
step, more than the step itself at batch 64.)

Shapes are static: the last batch is padded, the cache is allocated once at its final size, and each
step reads the cache prefix of its bucket length (kv_cache.py).

Reproducibility: the noise of batch b comes from a generator seeded with (seed, b), so the same
seed, batch size and settings give the same tokens, however the labels are split over calls.
"""

from __future__ import annotations

import logging

import torch
import torch._dynamo

from twostage.config import ConfigError
from twostage.generators import guidance
from twostage.generators.ar.filters import guided_step
from twostage.generators.ar.kv_cache import bucket_length
from twostage.generators.ar.model import PREFIX, ARTransformer

log = logging.getLogger(__name__)


def _raise_recompile_limit(n: int) -> None:
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n))


class ARSampler:
    def __init__(self, model: ARTransformer, *, batch_size: int = 64, cfg_scale: float = 1.0,
                 cfg_until: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 kv_bucket: int = 32, compile: bool = False, compile_mode: str = "default",
                 cuda_graphs: bool | None = None, dtype: torch.dtype | None = None):
        """cfg_scale follows the one guidance rule (twostage/generators/guidance.py): 1 samples the
        conditional model alone (no doubled batch), any other s runs the doubled batch and draws from
        uncond + s (cond - uncond) (s = 0: unconditional). cfg_until: steps 0..cfg_until-1 are guided
        (step 0 draws z_0), later ones use the conditional logits only. compile_mode is
        torch.compile's (default, max-autotune-no-cudagraphs). cuda_graphs (default: on CUDA devices)
        captures the steps. dtype: the cache dtype (default: the model's)."""
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ConfigError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
        self.model = model.eval()
        self.batch = batch_size
        self.cfg_scale = guidance.check_scale(cfg_scale)
        self.guided = guidance.active(self.cfg_scale)  # the batch is doubled: [conditional; null class]
        self.cfg_until = cfg_until
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.kv_bucket = kv_bucket
        self.dtype = dtype
        self.rows = 2 * batch_size if self.guided else batch_size
        self.compiled = compile
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._step = self._decode_step
        if compile:
            # One compilation symbolic in the bucket length (marked dynamic per call) serves every
            # partial bucket; the last, full-cache bucket has other strides and gets its own.
            _raise_recompile_limit(32)
            mode = None if compile_mode == "default" else compile_mode
            self._step = torch.compile(self._decode_step, mode=mode, fullgraph=True)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._state: dict[str, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def _guided(self, step: int) -> bool:
        return self.guided and (self.cfg_until is None or step < self.cfg_until)

    def _next(self, logits: torch.Tensor, noise: torch.Tensor | None, guided: bool) -> torch.Tensor:
        if not guided:
            logits = logits[: self.batch]  # no guidance, or CFG switched off: conditional rows only
        return guided_step(logits, noise, batch=self.batch, cfg_scale=self.cfg_scale, temperature=self.temperature,
                           top_k=self.top_k, top_p=self.top_p)

    def _decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_positions: torch.Tensor,
                     noise: torch.Tensor | None, guided: bool, record: bool = False):
        fed = torch.cat([tokens, tokens]) if self.guided else tokens
        logits = self.model.decode(fed, pos, kv_positions)
        nxt = self._next(logits, noise, guided)
        return nxt, (logits[: self.batch].float() if record else None)

    # -- buffers ----------------------------------------------------------------------------------------

    def release(self) -> None:
        """Free the KV cache, the static buffers and the captured graphs."""
        self.model.clear_caches()
        self._graphs.clear()
        self._state = None

    def _buffers(self) -> dict[str, torch.Tensor]:
        """Everything a step reads or writes, allocated once: captured graphs bake in addresses."""
        if self._state is None or not self.model.has_caches(self.rows, self.dtype):
            self._graphs.clear()
            self.model.setup_caches(self.rows, self.dtype)
            dev, n = self.device, self.model.num_tokens
            self._state = {
                "positions": torch.arange(self.model.seq_len, device=dev),
                "noise": torch.empty(self.batch, self.model.vocab_size, device=dev),
                "out": torch.empty(n, self.batch, dtype=torch.int64, device=dev),  # row t = token t
                "pos": torch.zeros((), dtype=torch.int64, device=dev),  # sequence position fed next
            }
        return self._state

    # -- sampling ---------------------------------------------------------------------------------------

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
        try:
            for b, start in enumerate(range(0, len(labels), self.batch)):
                chunk = labels[start : start + self.batch]
                tokens, logits = self._sample_batch(chunk, seed, first_batch + b, return_logits)
                outs.append(tokens[: len(chunk)])
                if return_logits:
                    logit_outs.append(logits[: len(chunk)])
        finally:
            # Compiled / graphed samplers keep cache and graphs for the next call (release() frees).
            if not (self.compiled or self.cuda_graphs):
                self.release()
        h, w = self.model.grid
        tokens = torch.cat(outs).view(-1, h, w) if outs else torch.empty(0, h, w, dtype=torch.int64)
        return (tokens, torch.cat(logit_outs)) if return_logits else tokens

    def _sample_batch(self, labels: torch.Tensor, seed: int, batch_index: int, record: bool):
        model, n_tok, B, dev = self.model, self.model.num_tokens, self.batch, self.device
        if len(labels) < B:  # pad to the static batch; padded rows are dropped by the caller
            labels = torch.cat([labels, labels.new_zeros(B - len(labels))])
        gen = torch.Generator(device=dev)
        gen.manual_seed(int(seed) * 1_000_003 + batch_index)
        st = self._buffers()
        noise_buf = st["noise"] if self.temperature > 0 else None

        def noise():  # Exp(1) draws for the Gumbel-max sample, in place in the static buffer
            return None if noise_buf is None else noise_buf.exponential_(generator=gen)

        fed_labels = labels
        if self.guided:
            fed_labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
        first = model.prefill(fed_labels)
        st["out"][0] = self._next(first, noise(), self._guided(0))
        st["pos"].fill_(PREFIX)
        logits_rec = None
        if record:
            logits_rec = torch.empty(n_tok, B, model.vocab_size, device=dev)
            logits_rec[0] = first[:B].float()
        graphs = self.cuda_graphs and not record
        for t in range(1, n_tok):
            kv_len = bucket_length(PREFIX + t, self.kv_bucket, model.seq_len)  # positions 0..PREFIX+t-1 filled
            guided = self._guided(t)
            noise()
            if graphs:
                self._graph(kv_len, guided).replay()
                continue
            _, logits = self._advance(kv_len, guided, record)
            if record:
                logits_rec[t] = logits
        tokens = st["out"].t().clone()
        return tokens, (logits_rec.transpose(0, 1) if record else None)

    def _advance(self, kv_len: int, guided: bool, record: bool = False):
        """One step on the static buffers: feed out[pos - PREFIX] at `pos`, write out[pos - PREFIX + 1],
        advance pos. Everything stays on the device, so the same call can be captured in a graph."""
        st = self._state
        kv = st["positions"][:kv_len]
        if self.compiled and kv_len < self.model.seq_len:
            torch._dynamo.maybe_mark_dynamic(kv, 0)
        fed_index = (st["pos"] - PREFIX).view(1)
        tokens = st["out"].index_select(0, fed_index).view(-1)
        noise = st["noise"] if self.temperature > 0 else None
        nxt, logits = self._step(tokens, st["pos"], kv, noise, guided, record)
        st["out"].index_copy_(0, fed_index + 1, nxt.view(1, -1))
        st["pos"].add_(1)
        return nxt, logits

    def _graph(self, kv_len: int, guided: bool) -> torch.cuda.CUDAGraph:
        key = (kv_len, guided)
        if key not in self._graphs:
            st = self._state
            saved = {k: st[k].clone() for k in ("pos", "out")}
            # Warm up on a side stream (compiles, initializes cuBLAS workspaces), undo its effects on
            # the state (the cache write is repeated identically by the real step), then capture.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._advance(kv_len, guided)
            torch.cuda.current_stream().wait_stream(stream)
            for k, v in saved.items():
                st[k].copy_(v)
            graph = torch.cuda.CUDAGraph()
            if not hasattr(self, "_pool"):
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                self._advance(kv_len, guided)
            self._graphs[key] = graph
        return self._graphs[key]
