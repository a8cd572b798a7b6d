"""Unlabelled images as the primary case: flat folders and parquet without labels, scores that
skip label -1, real-image kinds (EXIF, 16-bit, float, palette, alpha, CMYK), antialiased views,
BatchNorm batches of one, tiny evaluation sets, and flat folders trained through Ray."""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from methods.data.image_files import (
    ImageSourceError,
    decode_image,
    list_image_folder,
    list_parquet,
    read_row_group,
    write_parquet,
)
from methods.data.views import crop_and_flip, view_spec
from methods.evaluation.cluster_scores import cluster_scores
from methods.evaluation.knn import knn_accuracy
from methods.evaluation.plots import embedding_plot, tsne_layout
from methods.evaluation.report import evaluate
from orchestration.config import ConfigError, load_config
from tests.conftest import ROOT


def _png(path, value: int = 0, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def _encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# --- sources ----------------------------------------------------------------------------------

def test_flat_and_nested_folders_are_unlabelled_sources(tmp_path):
    for name in ("b.png", "a.png", "2025/06/c.png", ".thumbnails/t.png", "._a.png"):
        _png(tmp_path / "photos" / name)
    table = list_image_folder(tmp_path / "photos")  # auto: an image outside any sub-folder
    assert [p.rsplit("/", 1)[1] for p in table.units["path"]] == ["c.png", "a.png", "b.png"]
    assert (table.units["label"] == -1).all() and table.classes == ()
    with pytest.raises(ImageSourceError, match="a.png is not in a class sub-folder"):
        list_image_folder(tmp_path / "photos", "folders")
    # every image in a sub-folder: classes by default, none when asked
    for name in ("cat/1.png", "cat/2.png", "dog/deep/3.png"):
        _png(tmp_path / "classes" / name)
    assert list_image_folder(tmp_path / "classes").units["label"].tolist() == [0, 0, 1]
    assert (list_image_folder(tmp_path / "classes", "none").units["label"] == -1).all()


def test_parquet_without_a_label_column_or_with_nulls_is_unlabelled_there(tmp_path):
    images = np.zeros((4, 1, 8, 8), np.uint8)
    write_parquet(images, None, tmp_path / "none")
    table = list_parquet(tmp_path / "none")  # labels: auto, the default label column is absent
    assert table.label_column is None
    assert read_row_group(table.units["path"][0], 0, "image", table.label_column)[1] == [-1] * 4
    with pytest.raises(ImageSourceError, match="has no column 'label'.*data.labels: none"):
        list_parquet(tmp_path / "none", labels="folders")
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoded = [_encoded(Image.new("L", (8, 8)))] * 3
    (tmp_path / "partly").mkdir()
    pq.write_table(pa.table({"image": encoded, "label": pa.array([3, None, 1], pa.int64())}),
                   tmp_path / "partly" / "p.parquet")
    table = list_parquet(tmp_path / "partly")
    assert read_row_group(table.units["path"][0], 0, "image", table.label_column)[1] == [3, -1, 1]


def test_label_minus_one_is_never_a_class():
    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(40, 8)), rng.normal(size=(10, 8))
    labels = np.repeat([0, 1], 20)
    base = knn_accuracy(bank, labels, queries, labels[:10], k=5)
    # unlabelled rows on either side are left out, not voted for or scored as class -1
    partial = np.concatenate([labels, [-1] * 5])
    noisy_bank = np.concatenate([bank, rng.normal(size=(5, 8)) * 100])
    assert knn_accuracy(noisy_bank[:40], partial[:40], queries, labels[:10], k=5) == base
    assert knn_accuracy(bank, labels, np.concatenate([queries, queries]),
                        np.concatenate([labels[:10], [-1] * 10]), k=5) == base
    assert math.isnan(knn_accuracy(bank, np.full(40, -1), queries, labels[:10]))
    scores = evaluate(bank, np.full(40, -1), queries, labels[:10])
    assert all(math.isnan(v) for v in scores.values())
    one_class = evaluate(bank, np.zeros(40, int), queries, np.zeros(10, int))
    assert math.isnan(one_class["linear"]) and one_class["knn"] == 1.0


# --- real image files -------------------------------------------------------------------------

def test_exif_orientation_decodes_upright():
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :20] = 255  # stored wide, white on the left
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the camera was held upright
    out = decode_image(_encoded(image, "JPEG", exif=exif.tobytes()), 8, 1)[0]
    assert out[:2].mean() > 200 and out[-2:].mean() < 50  # upright: white on top


def test_16_bit_and_float_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    out = decode_image(_encoded(Image.fromarray(ramp)), 32, 1)[0]
    assert out.min() == 0 and out.max() == 255 and 120 < out.mean() < 135  # not all white
    mid = decode_image(_encoded(Image.fromarray(np.full((8, 8), 32768, np.uint16))), 8, 1)
    assert abs(int(mid.mean()) - 128) <= 1
    unit = np.linspace(0, 1, 64).reshape(8, 8).astype(np.float32)
    out = decode_image(_encoded(Image.fromarray(unit), "TIFF"), 8, 1)[0]
    assert out.min() == 0 and out.max() == 255
    wide = unit * 1000 - 200  # a float range of its own: stretched from its min to its max
    out = decode_image(_encoded(Image.fromarray(wide), "TIFF"), 8, 1)[0]
    assert out.min() == 0 and out.max() == 255


def test_palette_alpha_and_cmyk_images_convert():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert decode_image(_encoded(palette), 4, 3)[:, 0, 0].tolist() == [200, 10, 10]
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black: shown over white
    assert decode_image(_encoded(clear), 4, 3).min() == 255
    clear_palette = Image.new("P", (8, 8), 0)
    clear_palette.putpalette([0, 0, 0] * 256)
    assert decode_image(_encoded(clear_palette, transparency=0), 4, 1).min() == 255
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    red = decode_image(_encoded(cmyk, "JPEG"), 4, 3)[:, 0, 0]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    assert decode_image(_encoded(Image.new("LA", (8, 8), (90, 255))), 4, 1).max() == 90


def test_photos_keep_their_aspect_and_tiny_images_decode():
    wide = np.zeros((30, 90), np.uint8)
    wide[:, 30:60] = 255  # a white square in the middle of a wide photo
    out = decode_image(_encoded(Image.fromarray(wide)), 12, 1)[0]
    assert out.min() > 200  # the centre square, not the whole photo squashed
    assert decode_image(_encoded(Image.new("L", (1, 1), 77)), 8, 1).tolist() == [[[77] * 8] * 8]


def test_views_antialias_when_they_downscale():
    stripes = torch.zeros(4, 1, 64, 64)
    stripes[..., ::2] = 1.0  # one-pixel stripes: any aliasing shows as 0s and 1s
    whole = replace(view_spec("small", size=8), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                    flip_p=0.0)
    out = crop_and_flip(stripes, whole, torch.Generator().manual_seed(0))
    assert out.std() < 0.05 and abs(out.mean() - 0.5) < 0.02
    # no downscale: unchanged images stay as they are
    same = crop_and_flip(stripes[:, :, :8, :8], whole, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, stripes[:, :, :8, :8])


def test_batchnorm_batch_of_one_is_refused_before_ray():
    with pytest.raises(ConfigError, match="optim.batch_size: 1 image.*at least 2 x 1 x"):
        load_config(None, ["data.name=digits", "method.name=simclr", "optim.batch_size=2",
                           "scaling.num_workers=2"])
    load_config(None, ["data.name=digits", "method.name=simclr", "optim.batch_size=4",
                       "scaling.num_workers=2"])


def test_plots_and_scores_work_on_a_few_images(tmp_path):
    rng = np.random.default_rng(0)
    for n in (1, 3, 6):
        features = rng.normal(size=(n, 16)).astype(np.float32)
        rows, xy = tsne_layout(features)
        assert xy.shape == (n, 2) and np.isfinite(xy).all()
        labels = np.arange(n) % 2
        assert embedding_plot(features, labels, tmp_path / f"{n}.png", class_names=("a", "b")).is_file()
        scores = cluster_scores(features, labels)
        assert n < 2 or all(np.isfinite(v) for v in scores.values())
    assert embedding_plot(features, np.full(6, -1), tmp_path / "unlabelled.png").is_file()
    from orchestration.evaluate import prototype_grid

    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    grid = prototype_grid(images, rng.normal(size=(3, 4)), rng.normal(size=(5, 4)), tmp_path / "g.png")
    assert grid.is_file()


# --- through Ray ------------------------------------------------------------------------------

def _flat_digits(root) -> None:
    """The digits training images as a flat folder of PNGs: no class sub-folders, no labels."""
    from methods.data.datasets import load_digits

    root.mkdir(parents=True)
    for i, image in enumerate(load_digits("train").images.numpy()):
        Image.fromarray(image[0]).save(root / f"{i:05d}.png")


@pytest.mark.slow
def test_flat_folder_trains_pcl_with_label_free_scores_and_eval_data(ray_cluster, tmp_path, capsys):
    from orchestration.cli import main

    _flat_digits(tmp_path / "photos")
    base = ["train", str(ROOT / "configs" / "tiny_digits.yaml"), "--set", "data.name=image_folder",
            f"data.root={tmp_path / 'photos'}", "data.image_size=8", "optim.epochs=2",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
            f"tracking.storage_path={tmp_path}/ray"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "rankme" in out and "align" in out and "no labelled set was given" in out
    assert main([*base, "eval_data.name=digits"]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              order_by=["attributes.start_time ASC"])
    unlabelled, scored = runs
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("rankme", "alignment", "uniformity", "cluster_entropy"):
            steps = {m.step for m in client.get_metric_history(run.info.run_id, key)}
            assert steps >= {1} if key == "cluster_entropy" else steps == {0, 1}, key
        assert 1 < run.data.metrics["rankme"] <= 128
    assert "test_knn" not in unlabelled.data.metrics and "knn_holdout" not in unlabelled.data.metrics
    assert "test_rankme" in unlabelled.data.metrics
    assert scored.data.metrics["test_knn"] > 0.5 and "knn_holdout" in scored.data.metrics
