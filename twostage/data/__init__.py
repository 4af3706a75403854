"""Data: the embedded Fashion-MNIST, image folders and npz arrays; transforms; resumable loading.

    from twostage.data import DataConfig, build_dataset, ResumableLoader
    train = build_dataset(DataConfig(), "train")          # (image [-1,1] CxHxW, label) items
    loader = ResumableLoader(train, batch_size=64, seed=0, num_workers=4)
"""

from twostage.data.build import SPLITS, DatasetInfo, build_dataset, describe, make_transform
from twostage.data.config import DataConfig
from twostage.data.datasets import ArrayDataset, SubsetDataset, split_indices, split_key
from twostage.data.errors import DataError
from twostage.data.folder import ImageFolderDataset
from twostage.data.loader import ResumableLoader, ResumableSampler, ShardSampler, eval_loader
from twostage.data.transforms import ImageTransform, flip_decision

__all__ = [
    "SPLITS", "ArrayDataset", "DataConfig", "DataError", "DatasetInfo", "ImageFolderDataset", "ImageTransform",
    "ResumableLoader", "ResumableSampler", "ShardSampler", "SubsetDataset", "build_dataset", "describe",
    "eval_loader", "flip_decision", "make_transform", "split_indices", "split_key",
]  # fmt: skip
