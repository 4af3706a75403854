"""The compression-generation trade-off study: sweeps, scaling-law fits, frontier report.

The study results table (shared contract between `study run` and `study report`)
File: `DIR/results.parquet` (pyarrow; also mirrored as `DIR/results.csv` for eyeballing). One row per
stage-2 (generator) run. Columns (null where not applicable):
- identity: `study` (str), `run_id` (str: config hash of the generator job incl. its tokenizer id),
  `tokenizer_id` (str: config hash of the tokenizer job), `tokenizer_label` (str, human readable,
  e.g. "vq f4 K1024 +CRT", "kl f4d8 +VF"), `generator_label` (str, e.g. "ar small 2000 steps")
- tokenizer axes: `tokenizer_kind` ("vq"|"kl"), `downsample` (int f), `tokens_per_image` (int),
  `codebook_size` (int|null), `latent_channels` (int|null), `crt` (bool), `vf` (bool)
- generator axes: `generator_kind` ("ar"|"dit"), `generator_size` (str), `train_steps` (int),
  `batch_size` (int), `params` (int, non-embedding parameters of the generator),
  `tokens_seen` (int = train_steps * batch_size * tokens_per_image),
  `flops_per_token` (float, training FLOPs per token: forward+backward = 3x forward),
  `compute` (float, C = training FLOPs of the generator run = flops_per_token * tokens_seen)
- stage-2 metrics: `val_loss` (float; AR: cross-entropy nats/token; DiT: flow validation loss),
  `val_loss_per_position` (list<float>, AR only)
- generation metrics: `gfd` (float, the FD value), `gfd_name` (str, e.g. "FD-EffNetLite0" — never "FID"
  unless the network is Inception-v3), `is_score`, `precision`, `recall`, `gen_protocol` (JSON str: sample
  count, label sampling, sampler, steps, cfg, precision, feature network + checksum, reference, seed, version)
- reconstruction metrics of the tokenizer: `rfd`, `psnr`, `ssim`, `codebook_usage` (float|null, VQ),
  `latent_uniformity_gini`, `latent_uniformity_entropy` (float|null, KL: VA-VAE's t-SNE + KDE numbers),
  `recon_protocol` (JSON str)
- bookkeeping: `tokenizer_run`, `generator_run`, `samples_npz`, `grid_png` (str paths relative to DIR),
  `wall_s_tokenizer`, `wall_s_generator` (float), `device` (str)
"""
