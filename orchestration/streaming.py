"""Streaming an image folder or parquet source to the Train workers with Ray Data.

The driver lists the source (``builders.table_splits``: file names, parquet footers, no
decoding) and builds one Ray Data pipeline per worker: the worker's fixed shard of decode units
(``ImageTable.shard``: units r, r + W, ...), reshuffled every epoch, decoded and resized by
``methods.data.image_files.decode_units`` in Ray Data CPU tasks. Worker r reads it with
``ray.train.get_dataset_shard(f"train_{r}")`` and receives uint8 batches with the global index of
every image; the views run on the training device as for in-memory data.

Why fixed shards rather than Ray's streaming split: DDP steps all ranks in lockstep, so the
split's load balancing buys nothing, while a fixed shard keeps what the in-memory path promises:
a memory bank's rows live on the rank that owns them (InstDisc), and the E-step's encoding pass
covers every image exactly once (Ray's equal split drops rows to even the ranks out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import ray.data
from ray.data import ExecutionOptions, ExecutionResources
from ray.train import DataConfig

from methods.data.image_files import ImageTable, decode_units
from orchestration.builders import TableSplits
from orchestration.config import ExperimentConfig

UNITS_PER_BLOCK = 256  # image files per Ray Data block: one decoding task's work


def decoded(table: ImageTable, image_size: int, channels: int, shuffle: bool, seed: int = 0
            ) -> ray.data.Dataset:
    """A lazy dataset of ``{"index", "label", "image"}`` rows (image uint8 ``[C, S, S]``) for
    every decodable image of ``table``.

    ``shuffle``: the units are permuted once (seeded), so every block of ``UNITS_PER_BLOCK`` is a
    random mix, and the blocks are visited in a new order on every iteration; the worker's local
    shuffle buffer mixes neighbouring blocks. Ray's ``random_shuffle`` is an all-to-all exchange
    whose cost grew with the shard (minutes and gigabytes in the consumer at 300,000 units).
    """
    rows = [dict(zip(table.units, values, strict=True))
            for values in zip(*(v.tolist() for v in table.units.values()), strict=True)]
    if shuffle:
        rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    per_block = UNITS_PER_BLOCK if table.units["row_group"][0] < 0 else 1
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // per_block))
    if shuffle:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        decode_units, batch_format="numpy", batch_size=per_block, num_cpus=1,
        fn_kwargs={"size": image_size, "channels": channels, "image_column": table.image_column,
                   "label_column": table.label_column})


@dataclass
class Stream:
    """What ``TorchTrainer`` gets (``datasets``, ``data_config``) and what every worker needs to
    know about its shard without listing the source again (``info``)."""

    datasets: dict[str, ray.data.Dataset]
    data_config: DataConfig
    info: dict


def stream_datasets(cfg: ExperimentConfig, tables: TableSplits) -> Stream:
    """Per-worker training pipelines (``train_<rank>``) plus the small online-kNN sets
    (``knn_bank``, ``knn_holdout``), each with the execution limits ``data.decode_cpus`` and
    ``data.object_store_mb``: Ray Data applies them per dataset, so per worker here."""
    d, world = cfg.data, cfg.scaling.num_workers
    shards = [tables.train.shard(r, world) for r in range(world)]
    datasets = {f"train_{r}": decoded(shard, d.image_size, tables.channels, True, cfg.seed + r)
                for r, shard in enumerate(shards)}
    datasets["knn_bank"] = decoded(tables.knn_bank, d.image_size, tables.channels, False)
    datasets["knn_holdout"] = decoded(tables.holdout, d.image_size, tables.channels, False)
    limits = ExecutionOptions(resource_limits=ExecutionResources(
        cpu=d.decode_cpus, object_store_memory=d.object_store_mb * 2**20))
    info = {"num_images": len(tables.train), "channels": tables.channels,
            "rank_images": [len(s) for s in shards]}
    # nothing split by Ray: worker r asks for "train_<r>" only (``ray.train.get_dataset_shard``)
    return Stream(datasets, DataConfig(datasets_to_split=[], execution_options=limits), info)

