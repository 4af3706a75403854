"""Speed of the AR generator on one GPU: training throughput / MFU and sampling throughput.

    python benchmarks/bench_ar.py                       # B and L training, B sampling at batch 64 and 256
    python benchmarks/bench_ar.py --skip-sample --sizes L --train-compile-mode max-autotune-no-cudagraphs
    python benchmarks/bench_ar.py --skip-train --decode-attn sdpa matmul --kv-bucket 1 32

Training (what the engine does per step, bf16 autocast, fp32 master weights): forward with the
fused cross-entropy, backward, gradient clipping at 1, fused AdamW (lr 1e-4, betas (0.9, 0.95),
wd 0.05 on matrices), label dropout 0.1, the recipe's dropout 0.1 (--no-dropout turns it off);
the model is compiled in place like the engine's train.compile (--train-compile-mode picks the mode).
Inputs: 16x16 = 256 tokens, codebook 16384, 1000 classes (ImageNet 256 with VQ-16).

    FLOPs per token (training) = 6 * N + 12 * layers * width * T   (ARTransformer.flops_per_token)
    N = matmul parameters (all matmul weights incl. the output head), T = 256 (the sequence)
    MFU = FLOPs per token * tokens/s / peak (750 TFLOP/s: H100 SXM dense bf16, as the reference numbers)

Sampling: bf16 weights and KV cache, static cache, CFG 2.0 with the batch doubled (--cfg 1: no
guidance, not doubled), top-k all / top-p 1 / temperature 1, the decoding step compiled and captured
as CUDA graphs (twostage/generators/ar/sampler.py), timed over one whole batch of 256 steps (prefill,
decoding and sampling included) after a warm-up batch.

    bandwidth floor per step = (bf16 weights + KV cache filled so far, both read once) / bandwidth
    averaged over the 256 steps; "bucketed" counts the cache prefix a step actually reads (rounded up
    to --kv-bucket positions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twostage.engine.optim import build_optimizer  # noqa: E402
from twostage.engine.task import OptimConfig  # noqa: E402
from twostage.generators.ar.model import ARTransformer  # noqa: E402
from twostage.generators.ar.sampler import ARSampler  # noqa: E402
from twostage.generators.ar.config import ARModelConfig  # noqa: E402
from twostage.generators.ar.kv_cache import KVCache, bucket_length  # noqa: E402
from twostage.generators.outputs import balanced_labels  # noqa: E402

GRID, VOCAB, CLASSES = (16, 16), 16384, 1000


def build(size: str, dropout: bool, device) -> ARTransformer:
    p = 0.1 if dropout else 0.0
    cfg = ARModelConfig(size=size, token_dropout=p, resid_dropout=p, ffn_dropout=p)
    return ARTransformer(cfg, VOCAB, CLASSES, GRID).to(device)


def bench_train(size: str, batch: int, steps: int, warmup: int, mode: str, dropout: bool, peak: float) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build(size, dropout, device).train()
    flops_token = model.flops_per_token()["train"]
    opt = build_optimizer([model], OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05), device)
    params = [p for p in model.parameters()]
    if mode != "none":
        model.compile(mode=None if mode == "default" else mode)
    batches = [(torch.randint(0, VOCAB, (batch, model.num_tokens), device=device),
                torch.randint(0, CLASSES, (batch,), device=device)) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        tokens, labels = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            drop = torch.rand(labels.shape, device=device) < 0.1
            labels = torch.where(drop, torch.full_like(labels, CLASSES), labels)
            loss = model(tokens, labels, per_token_loss=True).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(steps):
        loss = step(i)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    tokens_s = batch * model.num_tokens * steps / seconds
    out = {"size": size, "batch": batch, "tokens_per_s": tokens_s, "step_ms": 1e3 * seconds / steps,
           "mfu": flops_token * tokens_s / peak, "flops_per_token": flops_token, "compile_mode": mode,
           "dropout": dropout, "params_M": model.param_counts()["total"] / 1e6, "warmup_s": compile_s,
           "loss": float(loss), "max_mem_GB": torch.cuda.max_memory_allocated() / 1e9}
    del model, opt, params, batches
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def bandwidth_floor_ms(model: ARTransformer, rows: int, bucket: int, bandwidth: float) -> tuple[float, float]:
    """(exact, bucketed) mean ms per step to read the bf16 weights and the filled KV cache once."""
    layers, width, _ = model.cfg.shape
    weights = 2 * model.param_counts()["non_embedding"]
    per_position = 2 * layers * rows * width * 2  # k and v, bf16
    steps = model.num_tokens
    exact = sum(weights + per_position * (t + 1) for t in range(steps))
    bucketed = sum(weights + per_position * bucket_length(t + 1, bucket, model.seq_len) for t in range(steps))
    return 1e3 * exact / bandwidth / steps, 1e3 * bucketed / bandwidth / steps


def bench_sample(size: str, batch: int, cfg: float, mode: str, bucket: int, bandwidth: float, graphs: bool,
                 profile: bool = False) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build(size, False, device)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # non-uniform predictions, as after training
    model = model.to(torch.bfloat16).eval()
    sampler = ARSampler(model, batch_size=batch, cfg_scale=cfg, kv_bucket=bucket, compile=mode != "none",
                        compile_mode=mode, cuda_graphs=graphs)
    labels = torch.as_tensor(balanced_labels(batch, CLASSES))[torch.randperm(batch)]
    t0 = time.perf_counter()
    sampler.sample(labels, seed=0)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    sampler.sample(labels, seed=1)  # a second warm-up: every graph recorded and replayed once
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = sampler.sample(labels, seed=2)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    steps = model.num_tokens
    exact, bucketed = bandwidth_floor_ms(model, sampler.rows, bucket, bandwidth)
    out = {"size": size, "batch": batch, "cfg": cfg, "images_per_s": batch / seconds, "ms_per_step": 1e3 * seconds / steps,
           "floor_ms_per_step": exact, "bucketed_floor_ms_per_step": bucketed, "compile_mode": mode,
           "kv_bucket": bucket, "decode_attn": KVCache.impl, "cuda_graphs": graphs, "warmup_s": warm_s,
           "distinct_tokens": int(tokens.unique().numel()), "max_mem_GB": torch.cuda.max_memory_allocated() / 1e9}
    sampler.release()
    if profile:
        # Kernel time breakdown of one batch, launched kernel by kernel (graph replays hide kernels).
        from torch.profiler import ProfilerActivity, profile as torch_profile

        plain = ARSampler(model, batch_size=batch, cfg_scale=cfg, kv_bucket=bucket, compile=mode != "none",
                          compile_mode=mode, cuda_graphs=False)
        plain.sample(labels, seed=0)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            plain.sample(labels, seed=1)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70), flush=True)
        plain.release()
    del model, sampler
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["B", "L"], help="training sizes")
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--train-warmup", type=int, default=8)
    ap.add_argument("--train-compile-mode", default="default",
                    help="default | max-autotune-no-cudagraphs | none (eager)")
    ap.add_argument("--no-dropout", action="store_true", help="train without the recipe's dropout 0.1")
    ap.add_argument("--sample-size", default="B")
    ap.add_argument("--sample-batches", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--compile-mode", default="default",
                    help="sampling step: default | max-autotune-no-cudagraphs | none (eager)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="launch the sampling step's kernels one by one")
    ap.add_argument("--kv-bucket", type=int, nargs="+", default=[32], help="one run per value")
    ap.add_argument("--decode-attn", nargs="+", default=["matmul"], choices=("sdpa", "matmul"),
                    help="one run per value")
    ap.add_argument("--peak-tflops", type=float, default=750.0)
    ap.add_argument("--bandwidth-tbs", type=float, default=3.0, help="memory bandwidth for the floor, TB/s")
    ap.add_argument("--profile", action="store_true", help="print the sampling step's kernel time breakdown")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-sample", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_ar needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    results: dict[str, list] = {"train": [], "sample": []}
    if not args.skip_train:
        for size in args.sizes:
            r = bench_train(size, args.train_batch, args.train_steps, args.train_warmup, args.train_compile_mode,
                            not args.no_dropout, args.peak_tflops * 1e12)
            results["train"].append(r)
            print(json.dumps(r), flush=True)
    if not args.skip_sample:
        for batch in args.sample_batches:
            for bucket in args.kv_bucket:
                for attn in args.decode_attn:
                    KVCache.impl = attn
                    r = bench_sample(args.sample_size, batch, args.cfg, args.compile_mode, bucket,
                                     args.bandwidth_tbs * 1e12, not args.no_cuda_graphs, args.profile)
                    results["sample"].append(r)
                    print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\ntraining: FLOPs/token = 6*N_matmul + 12*layers*width*256; MFU against "
          f"{args.peak_tflops:.0f} TFLOP/s")
    for r in results["train"]:
        print(f"  {r['size']:>3} batch {r['batch']:4d}: {r['tokens_per_s'] / 1e3:7.1f}k tokens/s  MFU {r['mfu']:.3f}  "
              f"{r['step_ms']:6.1f} ms/step  ({r['params_M']:.0f}M params, compile {r['compile_mode']}, "
              f"dropout {'0.1' if r['dropout'] else '0'})")
    if results["sample"]:
        doubled = "batch doubled" if args.cfg != 1.0 else "no guidance, batch not doubled"
        print(f"sampling: CFG {args.cfg} ({doubled}), bf16, floor at {args.bandwidth_tbs} TB/s")
    for r in results["sample"]:
        print(f"  {r['size']:>3} batch {r['batch']:4d}: {r['images_per_s']:7.1f} images/s  {r['ms_per_step']:.3f} ms/step  "
              f"(floor {r['floor_ms_per_step']:.3f} ms exact, {r['bucketed_floor_ms_per_step']:.3f} ms bucketed; "
              f"compile {r['compile_mode']}, graphs {r['cuda_graphs']}, bucket {r['kv_bucket']}, attn {r['decode_attn']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
