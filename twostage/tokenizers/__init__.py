"""Stage-1 tokenizers: one subpackage per kind (vq/, kl/), named in twostage/registry.py.

    from twostage.tokenizers import load_tokenizer
    tok = load_tokenizer("runs/vq_f8")        # any kind's `twostage tokenizer train` run folder
    codes = tok.encode(images)                # images float [-1, 1] (N, C, H, W)
    images = tok.decode(codes)

Shared by the kinds: the inference base class (base.py), the training Task base (autoencoder_task.py),
the conv trunk (conv.py), the PatchGAN and adaptive weights (discriminator.py), the perceptual loss
(perceptual.py), config sections (config.py), and training / encoding runs (run.py).
"""

from twostage.tokenizers.base import CacheLayout, Tokenizer, load_tokenizer

__all__ = ["CacheLayout", "Tokenizer", "load_tokenizer"]
