"""The compression-generation trade-off study: sweeps, scaling-law fits, frontier report.

The study results table (shared contract between `study run` and `study report`)
File: `DIR/results.parquet` (pyarrow; also mirrored as `DIR/results.csv` for eyeballing). One row per
evaluation: (generator run, evaluation seed). Columns (null where not applicable):
- identity: `study` (str), `run_id` (str: config hash of the generator job incl. its tokenizer id; differs
  per seed), `tokenizer_id` (str: config hash of the tokenizer job; differs per tokenizer seed),
  `tokenizer_label` (str, human readable, e.g. "vq f4 K1024 +CRT", "kl f4d8 +VF"), `generator_label`
  (str, e.g. "ar small 2000 steps")
- replicates: `tokenizer_cell` (str: the tokenizer's grid point, the same for all its seeds; an entry with
  `generator_overrides` is a cell of its own, labelled e.g. "kl f4d16 / dit +REPA", sharing its tokenizer runs),
  `generator_cell` (str: the generator run's grid point incl. the tokenizer cell, size and budget; the
  same for all seeds), `tokenizer_seed`, `generator_seed`, `eval_seed` (int: tokenizer train.seed,
  generator train.seed, sampling seed). Rows of one generator_cell differ only in their seeds; the report
  aggregates them (mean and 95% interval over seeds) and pairs cells by seed. Tables written before these
  columns read as one seed per cell (tokenizer_cell = tokenizer_id, generator_cell = run_id, seeds 0).
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
- the evaluation's own uncertainty and unbiased generation metrics (float|null, same network as gfd_name):
  `gfd_low`, `gfd_high` (bootstrap interval of gfd over resamples of the sample set), `gfd_inf`,
  `gfd_inf_stderr` (FD extrapolated to N = inf, "FDinf-<net>"), `kid`, `kid_stderr` ("KID-<net>")
- reconstruction metrics of the tokenizer: `rfd`, `psnr`, `ssim`, `codebook_usage` (float|null, VQ),
  `latent_uniformity_gini`, `latent_uniformity_entropy` (float|null, KL: VA-VAE's t-SNE + KDE numbers),
  `recon_protocol` (JSON str), `code_entropy` (float|null, VQ: unigram entropy of the val cache's codes,
  nats; code_entropy - val_loss is the AR model's gain from context)
- bookkeeping: `tokenizer_run`, `generator_run`, `samples_npz`, `grid_png` (str paths relative to DIR; a pretrained
  tokenizer's `tokenizer_run` is its run folder as the spec names it),
  `wall_s_tokenizer`, `wall_s_generator` (float), `device` (str)
"""
