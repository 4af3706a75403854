"""RAE tokenizer kind (Representation Autoencoder, arXiv:2510.11690; docs/methods.md §7, (7.10)-(7.12)):
`config` (run config), `encoder` (the frozen representation encoder), `decoder` (the trained ViT decoder),
`model` (noise augmentation, latent normalization), `task` (training through the shared engine),
`tokenizer` (inference). Registered in twostage/registry.py as kind "rae"."""
