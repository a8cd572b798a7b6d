"""What one Train worker iterates: its fixed shard of the training images, from memory or from
a Ray Data stream, behind one interface (``batches``, ``encode``, ``knn_sets``,
``num_classes``).

Both give rank r the images r, r + W, r + 2W, ... of the training set (in-memory: of the images;
streamed: of the decode units, ``orchestration.streaming``) in a fresh order every epoch, and both
run the same number of steps on every rank, as DDP and ``ray.train.report`` need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import ray.train
import torch

from methods.base import Batch, Method
from methods.data.datasets import ImageDataset
from methods.training import all_ranks, encode, epoch_batches, memory_batches, sum_over_ranks
from orchestration.builders import KNN_BANK_SIZE, Splits

ENCODE_BATCH = 1024  # images per forward pass of the E-step's encoding
SHUFFLE_BUFFER_BATCHES = 4  # a streamed epoch mixes rows over this many batches' worth


class MemoryShard:
    """This rank's shard of a training set decoded into this process's memory."""

    def __init__(self, splits: Splits, batch_size: int, seed: int, rank: int, world: int):
        self.train, self.holdout = splits.train, splits.holdout
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.num_images = len(self.train)
        self.in_channels, self.image_size = self.train.in_channels, self.train.image_size
        self.steps = len(self._indices(0))
        # left out when the set was decoded; every rank decoded all of it, rank 0 counts them
        self.skipped = self.train.skipped if rank == 0 else 0

    def _indices(self, epoch: int) -> list[torch.Tensor]:
        return epoch_batches(self.num_images, self.batch_size, epoch, self.seed, self.rank,
                             self.world)

    def batches(self, epoch: int) -> Iterator[Batch]:
        return memory_batches(self.train, self._indices(epoch))

    def encode(self, fn: Callable, method: Method, device, precision: str
               ) -> tuple[np.ndarray, np.ndarray]:
        """(indices [n], features [n, D]) of this rank's images, un-augmented."""
        shard = torch.arange(self.rank, self.num_images, self.world)
        return shard.numpy(), encode(fn, self.train.images[shard], method, device=device,
                                     precision=precision)

    def knn_sets(self) -> tuple[ImageDataset, ImageDataset]:
        """(bank, queries) of the online kNN: the first training images and the hold-out."""
        return self.train.subset(torch.arange(min(KNN_BANK_SIZE, self.num_images))), self.holdout

    def num_classes(self) -> int:
        """1 + the largest label of the training and hold-out images; 0 when none is labelled.
        Every rank holds the whole set, so every rank computes the same number."""
        return _classes(torch.cat([self.train.labels, self.holdout.labels]))


class StreamShard:
    """This rank's shard as Ray Data streams it (``ray.train.get_dataset_shard("train_<rank>")``).

    ``info`` is ``orchestration.streaming.Stream.info``. A shard may yield fewer images than it
    lists (unreadable files are skipped, ``skipped`` counts them after each full pass), so the
    ranks agree on every step before taking it: an epoch ends for all when one rank runs out.
    """

    def __init__(self, info: dict, image_size: int, batch_size: int, prefetch_batches: int,
                 rank: int):
        self.iterator = ray.train.get_dataset_shard(f"train_{rank}")
        self.listed = info["rank_images"][rank]
        self.num_images, self.in_channels = info["num_images"], info["channels"]
        self.image_size, self.batch_size, self.prefetch = image_size, batch_size, prefetch_batches
        self.steps = min(info["rank_images"]) // batch_size
        if self.steps == 0:
            raise ValueError(f"batch size {batch_size} per worker is larger than the "
                             f"{min(info['rank_images'])} images the smallest shard holds")
        self.skipped = 0
        self.rank = rank
        self._knn: tuple[ImageDataset, ImageDataset] | None = None

    def _stream(self, batch_size: int, shuffle: bool = False) -> Iterator[Batch]:
        """Every decoded image of the shard once, in batches (the last one partial); counts the
        images that did not arrive in ``skipped`` once the pass is complete. ``shuffle`` mixes
        the rows of neighbouring blocks (``SHUFFLE_BUFFER_BATCHES`` batches' worth)."""
        seen = 0
        buffer = SHUFFLE_BUFFER_BATCHES * batch_size if shuffle else None
        for b in self.iterator.iter_torch_batches(batch_size=batch_size, drop_last=False,
                                                  prefetch_batches=self.prefetch, device="cpu",
                                                  local_shuffle_buffer_size=buffer):
            seen += len(b["index"])
            yield Batch(b["index"], b["image"], b["label"])
        self.skipped = self.listed - seen

    def batches(self, epoch: int) -> Iterator[Batch]:
        stream = self._stream(self.batch_size, shuffle=True)
        for _ in range(self.steps):
            batch = next(stream, None)
            if not all_ranks(batch is not None and len(batch.indices) == self.batch_size):
                break
            yield batch
        for _ in stream:  # the rest of the pass, so that ``skipped`` is counted
            pass

    def encode(self, fn: Callable, method: Method, device, precision: str
               ) -> tuple[np.ndarray, np.ndarray]:
        indices, features = [], []
        for batch in self._stream(ENCODE_BATCH):
            indices.append(batch.indices.numpy())
            features.append(encode(fn, batch.images, method, device=device, precision=precision))
        return np.concatenate(indices), np.concatenate(features)

    def knn_sets(self) -> tuple[ImageDataset, ImageDataset]:
        """Decoded once, on first use (rank 0 only asks): they are small and fixed."""
        if self._knn is None:
            self._knn = tuple(_collect(ray.train.get_dataset_shard(name))
                              for name in ("knn_bank", "knn_holdout"))
        return self._knn

    def num_classes(self) -> int:
        """1 + the largest label of the online-kNN sets (0 when none is labelled: a parquet
        source without ``data.label_column``), which rank 0 decodes and sends to the others.
        Collective: every rank calls it. A class missing from the kNN sets, and so from the
        probe, is left out of the probe's training (``OnlineProbe``)."""
        classes = _classes(torch.cat([s.labels for s in self.knn_sets()])) if self.rank == 0 else 0
        return sum_over_ranks(classes)


def _classes(labels: torch.Tensor) -> int:
    return int(labels.max()) + 1 if len(labels) and bool((labels >= 0).any()) else 0


def _collect(iterator) -> ImageDataset:
    images, labels = [], []
    for b in iterator.iter_torch_batches(batch_size=ENCODE_BATCH, device="cpu"):
        images.append(b["image"])
        labels.append(b["label"])
    return ImageDataset(torch.cat(images), torch.cat(labels))
