"""twostage: stage-1 tokenizers, stage-2 generators and the compression-generation trade-off."""

__version__ = "0.1.0"
