"""twostage: stage-1 tokenizers, stage-2 generators and the compression-generation trade-off.

    import twostage as ts
    cfg = ts.load_config("vq_fmnist_f4")
    ts.train_tokenizer(cfg, "runs/vq")

The verbs live in twostage/api.py; the kinds they serve are named in twostage/registry.py.
"""

__version__ = "0.1.0"

from twostage.api import (branch_generator, encode, evaluate_generation, evaluate_reconstruction,  # noqa: E402
                          load_config, load_generator, load_tokenizer, sample, save_pretrained, train_generator,
                          train_generator_replicas, train_tokenizer)

__all__ = ["__version__", "load_config", "train_tokenizer", "encode", "train_generator", "train_generator_replicas",
           "branch_generator", "sample", "load_tokenizer", "load_generator", "save_pretrained",
           "evaluate_reconstruction", "evaluate_generation"]
