"""Image folders and parquet files: listing, decoding with bad files, the bad-input lines, and
real streamed training through Ray Data (2 workers, PCL with its E-step). The streamed parquet
run, evaluated on its val/ split, is test_multinode's first run."""

from __future__ import annotations

import io

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from methods.data.image_files import check_channels, decode_units, list_image_folder, list_parquet
from orchestration.config import ConfigError, load_config
from orchestration.write_dataset import write_dataset
from tests.conftest import ROOT
from tests.faults import Faults

IMAGES = 2000  # per split of the generated Fashion-MNIST sources


def _add_bad_files(folder) -> None:
    """A truncated grayscale JPEG and a zero-byte PNG in class 0."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(buffer, format="JPEG")
    (folder / "train" / "0-T-shirt-top" / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (folder / "train" / "0-T-shirt-top" / "empty.png").write_bytes(b"")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    out = write_dataset("fashion_mnist", tmp_path_factory.mktemp("data") / "folder", limit=IMAGES)
    _add_bad_files(out)
    return out


@pytest.fixture(scope="module")
def parquet_source(tmp_path_factory):
    return write_dataset("fashion_mnist", tmp_path_factory.mktemp("data") / "pq", fmt="parquet",
                         limit=IMAGES, rows_per_group=100)


def test_bad_files_are_skipped_and_indices_do_not_shift(image_folder):
    table = list_image_folder(image_folder / "train")
    assert len(table) == IMAGES + 2 and table.classes[0] == "0-T-shirt-top"
    out = decode_units(table.units, 16, 1)
    paths = table.units["path"]
    bad = [i for i, p in enumerate(paths) if p.endswith(("truncated.jpg", "empty.png"))]
    assert len(out["index"]) == IMAGES and not set(bad) & set(out["index"].tolist())
    # every decoded image is the file its index names
    i = int(out["index"][-1])
    with Image.open(paths[i]) as image:
        expected = np.asarray(image.convert("L").resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out["image"][-1, 0], expected)
    assert check_channels(table) == 1  # the unreadable files are passed over, not an error


def test_parquet_rows_keep_their_global_index(parquet_source):
    table = list_parquet(parquet_source / "train")
    assert table.num_units == IMAGES // 100 and len(table) == IMAGES
    shard = table.shard(1, 2)
    out = decode_units({k: v[:2] for k, v in shard.units.items()}, 28, 1)
    assert out["index"].tolist() == list(range(100, 200)) + list(range(300, 400))
    from methods.data.datasets import load_fashion_mnist

    fm = load_fashion_mnist()
    np.testing.assert_array_equal(out["image"], fm.images[out["index"]].numpy())
    np.testing.assert_array_equal(out["label"], fm.labels[out["index"]].numpy())


def _train_args(root, name: str, tmp_path, *more: str) -> list[str]:
    return ["train", str(ROOT / "configs" / "tiny_digits.yaml"), "--set", f"data.name={name}",
            f"data.root={root}", "data.views=small",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db", *more]


def test_bad_sources_exit_2_with_one_line_before_ray(tmp_path, parquet_source, capsys):
    from orchestration.cli import main

    (tmp_path / "empty" / "cats").mkdir(parents=True)
    mixed = tmp_path / "mixed" / "a"
    mixed.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "0.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "1.png")
    cases = [
        (_train_args(tmp_path / "empty", "image_folder", tmp_path), "holds no images"),
        (_train_args(tmp_path / "mixed", "image_folder", tmp_path), "1.png has 3 channel(s)"),
        (_train_args(parquet_source, "parquet", tmp_path, "data.image_column=jpeg"),
         "has no column 'jpeg'"),
        (_train_args(tmp_path / "nowhere", "image_folder", tmp_path), "is not a folder"),
        # 2 workers, 20 row groups of 100 less the hold-out's 2: 9 each, not 64 rows per rank
        (_train_args(parquet_source, "parquet", tmp_path, "data.loader=stream",
                     "optim.batch_size=2048"), "less than a per-worker batch of 1024"),
    ]
    for args, expected in cases:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    # converting instead of refusing: data.channels names the channel count
    assert load_config(None, ["data.name=image_folder", "data.channels=3"]).data.channels == 3


def test_stream_loader_is_for_file_sources_and_auto_follows_size():
    with pytest.raises(ConfigError, match="data.loader: stream reads image_folder and parquet"):
        load_config(None, ["data.loader=stream"])
    d = load_config(None, ["data.name=image_folder", "data.image_size=64"]).data
    assert not d.streams(60_000, 3)  # 0.7 GB decoded: in memory
    assert d.streams(600_000, 3)  # 7 GB: streamed
    assert not load_config(None, ["data.name=digits"]).data.streams(10**9, 3)
    with pytest.raises(ConfigError, match="memory bank is split by image index"):
        load_config(None, ["data.name=parquet", "method.name=instdisc", "optim.lr=0.01"])
    load_config(None, ["data.name=image_folder", "method.name=instdisc", "optim.lr=0.01"])


@pytest.mark.slow
def test_ray_data_pipeline_decodes_every_image_once(ray_cluster, image_folder):
    from methods.data.datasets import decode_table
    from orchestration.streaming import decoded

    table = list_image_folder(image_folder / "train")
    ds = decoded(table, 20, 1, shuffle=True)
    rows = ds.take_all()
    order = np.argsort([r["index"] for r in rows])
    expected = decode_table(table, 20, 1)
    assert expected.skipped == 2 and len(rows) == IMAGES
    np.testing.assert_array_equal(np.stack([rows[i]["image"] for i in order]),
                                  expected.images.numpy())
    # every pass visits the images in a new order (the units are not in class order either)
    again = [r["index"] for r in ds.take_all()]
    assert sorted(again) == sorted(r["index"] for r in rows)
    assert again != [r["index"] for r in rows] and again != sorted(again)


def _metric(summary, key: str) -> dict[int, float]:
    client = MlflowClient(summary.tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(summary.run_id, key)}


def _streamed_config(name: str, root, tmp_path):
    return load_config(ROOT / "configs" / "tiny_digits.yaml", [
        f"data.name={name}", f"data.root={root}", "data.views=small", "data.loader=stream",
        "optim.epochs=2", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
        f"tracking.storage_path={tmp_path}/ray"])


@pytest.mark.slow
def test_streamed_pcl_on_an_image_folder_with_bad_files_resumes(ray_cluster, image_folder,
                                                                tmp_path):
    """2 workers, PCL 2 epochs (E-step in epoch 1), a worker SIGKILLed mid-way through epoch 1."""
    from orchestration.builders import table_splits
    from orchestration.run import train

    cfg = _streamed_config("image_folder", image_folder, tmp_path)
    summary = train(cfg, evaluate=False, plugins=[Faults(kill_worker_epoch=1, kill_step=3,
                                                  kill_rank=1, marker_dir=str(tmp_path))])
    assert (tmp_path / "worker_killed").exists()
    tags = MlflowClient(summary.tracking_uri).get_run(summary.run_id).data.tags
    assert tags["loader"] == "stream"
    listed = table_splits(cfg).train
    # the E-step encoded every readable training image once; both ranks got the same prototypes
    # (before the kill and again after the restart)
    assert sorted(summary.estep_log) == [1]
    assert summary.estep_log[1]["encoded"] == len(listed) - 2
    assert sorted(set(summary.estep_log[1]["ranks"])) == [0, 1]
    assert _metric(summary, "skipped_images") == {0: 2, 1: 2}
    steps = min(len(listed.shard(r, 2)) for r in range(2)) // 32  # per-rank batch 32
    # the epoch redone after the kill: each image at most once, the whole shard trained
    assert _metric(summary, "repeated_images") == {0: 0, 1: 0}
    assert _metric(summary, "images_trained") == {0: steps * 64, 1: steps * 64}

    # the online kNN of the streamed run: well above chance (0.1). Two epochs of PCL on 1,800
    # images do not reliably beat the untrained network's 0.5 on either loader (issue 35's note)
    assert all(v > 0.3 for v in _metric(summary, "knn_holdout").values())
