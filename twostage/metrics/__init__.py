"""Evaluation for both stages, offline by default (EfficientNet-Lite0 features; Inception-v3 and
DINOv2 from user-given weights files). Every result carries its protocol (`protocol.Protocol`), and
metric names derive from the feature network: only Inception-v3 gives "FID".

The networks themselves live one layer down, in twostage/backbones/ (`load_feature_network`); this
package only measures with them.

    extraction.py       extract_features: any image source -> batched float64 features
    frechet.py          Fréchet distance (float64) and feature statistics
    inception_score.py  IS-style score (10 splits)
    precision_recall.py improved precision / recall (k = 3)
    reference.py        reference statistics per dataset split, cached with their protocol
    generation.py       evaluate_generation (samples .npz vs reference; FD_inf, KID, FD bootstrap interval)
    reconstruction.py   evaluate_reconstruction (rFD, PSNR, SSIM, perceptual distance)
    latent.py           codebook usage / perplexity, per-position CE, latent uniformity
    unbiased.py         FD extrapolated to N = inf, KID, bootstrap spread of FD
    protocol.py         Protocol record, metric names, JSON results
    evaluate.py         evaluate a tokenizer run folder / a samples file, written as JSON records
    commands.py         `twostage eval gen|recon|stats`
    degradation.py      Fashion-MNIST train/test + degradation sanity study

Submodules are imported lazily (`from twostage.metrics.frechet import ...`) so importing the
package costs nothing.
"""
