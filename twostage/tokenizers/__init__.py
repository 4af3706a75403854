"""Stage-1 tokenizers. VQ (LlamaGen VQ-16 family, optional CRT regularizer):

    from twostage.tokenizers import Tokenizer
    tok = Tokenizer.from_pretrained("runs/vq_f8")     # a `twostage tokenizer train` run folder
    ids = tok.encode(images)                          # (N, h, w); images float [-1, 1] (N, C, H, W)
    images = tok.decode_indices(ids)

Training: `VQTokenizerTask(VQRunConfig)` through twostage.engine.trainer.train, or the CLI
(`twostage tokenizer train | encode | reconstruct`, see twostage/tokenizers/commands.py).
"""

from twostage.tokenizers.vq.config import CRTConfig, VQRunConfig, VQConfig
from twostage.tokenizers.config import LossConfig
from twostage.tokenizers.vq.model import VQModel
from twostage.tokenizers.vq.tokenizer import Tokenizer, TokenizerLoadError
from twostage.tokenizers.vq.task import VQTokenizerTask

__all__ = ["CRTConfig", "LossConfig", "Tokenizer", "TokenizerLoadError", "VQRunConfig", "VQConfig", "VQModel",
           "VQTokenizerTask"]
