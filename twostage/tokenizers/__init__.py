"""Stage-1 tokenizers. VQ (LlamaGen VQ-16 family, optional CRT regularizer):

    from twostage.tokenizers import Tokenizer
    tok = Tokenizer.from_pretrained("runs/vq_f8")     # a `twostage tokenizer train` run folder
    ids = tok.encode(images)                          # (N, h, w); images float [-1, 1] (N, C, H, W)
    images = tok.decode_indices(ids)

Training: `VQTokenizerTask(TokenizerRunConfig)` through twostage.engine.trainer.train, or the CLI
(`twostage tokenizer train | encode | reconstruct`, see twostage/tokenizers/commands.py).
"""

from twostage.tokenizers.config import CRTConfig, LossConfig, TokenizerRunConfig, VQConfig
from twostage.tokenizers.model import VQModel
from twostage.tokenizers.pretrained import Tokenizer, TokenizerLoadError
from twostage.tokenizers.task import VQTokenizerTask

__all__ = ["CRTConfig", "LossConfig", "Tokenizer", "TokenizerLoadError", "TokenizerRunConfig", "VQConfig", "VQModel",
           "VQTokenizerTask"]
