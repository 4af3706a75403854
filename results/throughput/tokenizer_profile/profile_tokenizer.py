"""Where a VQ tokenizer step's time goes on a GPU: step time with and without loader workers, then a
torch.profiler table over 30 steps (run from the repository root; writes $OUT/tok_prof.txt).

    OUT=/tmp/out python results/throughput/tokenizer_profile/profile_tokenizer.py

Used once (device tool, one H200, torch 2.11.0+cu130, 2026-12-01; the tokenizer code of 4a8f060) to see whether the
tokenizer stage of a study is launch-bound or bound by GPU work: `tok_prof.txt` beside this file is its
output. Self CUDA time total over the 30 profiled steps (982 ms, incl. start-up) is ~33 ms of GPU work per
step; convolution backward, GroupNorm and NCHW/NHWC conversions lead the table.
"""
import os, sys, time, torch, logging
sys.path.insert(0, os.getcwd())
from twostage import api
from torch.profiler import profile, ProfilerActivity
out = os.environ["OUT"]
logging.basicConfig(level=logging.WARNING)
f = open(f"{out}/tok_prof.txt", "w")
for nw in [4, 0]:
    cfg = api.load_config("vq_fmnist_f4", ["train.steps=200", "train.ckpt_every=100000", "train.log_every=50", f"train.num_workers={nw}", "train.progress=false"])
    t = time.perf_counter(); logs = api.train_tokenizer(cfg, f"/tmp/p/tok{nw}"); dt = time.perf_counter() - t
    print("TOK nw", nw, "wall", dt, "step_time", logs.get("perf/step_time_s"), file=f, flush=True)
cfg = api.load_config("vq_fmnist_f4", ["train.steps=30", "train.ckpt_every=100000", "train.log_every=10", "train.num_workers=4", "train.progress=false"])
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t = time.perf_counter(); api.train_tokenizer(cfg, "/tmp/p/tokprof"); dt = time.perf_counter() - t
ka = prof.key_averages()
print("TOK PROF 30 steps wall", dt, file=f)
print(ka.table(sort_by="self_cuda_time_total", row_limit=30), file=f)
print(ka.table(sort_by="self_cpu_time_total", row_limit=30), file=f)
print(ka.table(sort_by="cpu_time_total", row_limit=40), file=f)
f.close()
