"""Batched augmentation: per-image randomness, determinism under a seed, and the degenerate
settings that must reduce to the plain network input."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from methods.data.views import PRESETS, ViewSpec, augment, gaussian_blur, to_input, view_spec

NO_AUG = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
              blur_p=0.0)


def _asymmetric_image(channels: int = 1, size: int = 28) -> torch.Tensor:
    """One uint8 image ``[C, H, W]`` with no mirror or translation symmetry."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = (xx * 7 + yy * yy * 3 + (xx * yy) % 11) % 256
    img[2:9, 3:6] = 255  # a bar near the top-left corner
    img = torch.stack([(img + 40 * c) % 256 for c in range(channels)])
    return img.to(torch.uint8)


def _batch_of_copies(b: int = 8, channels: int = 1) -> torch.Tensor:
    return _asymmetric_image(channels).unsqueeze(0).repeat(b, 1, 1, 1)


def test_identical_images_get_different_views():
    batch = _batch_of_copies(8)
    for name in ("digits", "small", "simclr"):
        out = augment(batch, view_spec(name, size=20), torch.Generator().manual_seed(0))
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                assert (out[i] - out[j]).abs().max() > 1e-3, f"{name}: images {i} and {j} got the same view"


def test_crop_alone_differs_between_batch_members():
    # only the random resized crop is active: the difference must come from per-image crop boxes
    spec = ViewSpec(size=20, crop_scale=(0.2, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    out = augment(_batch_of_copies(8), spec, torch.Generator().manual_seed(1))
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) == 8


def test_torchvision_v2_crops_a_batch_identically():
    """Why views.py does not use transforms.v2 on batches: one parameter set for the whole batch."""
    torch.manual_seed(0)
    batch = _batch_of_copies(8)
    out = v2.RandomResizedCrop(20, scale=(0.2, 1.0), antialias=True)(batch)
    assert out.shape == (8, 1, 20, 20)
    assert all(torch.equal(out[0], out[i]) for i in range(1, 8))
    # ... and it did crop (not the plain resize), so the identity is not from a trivial crop
    full = v2.functional.resize(batch[:1], [20, 20], antialias=True)
    assert not torch.equal(out[0], full[0])


def test_seed_determinism():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    spec = view_spec("simclr", size=12)
    a = augment(batch, spec, torch.Generator().manual_seed(42))
    b = augment(batch, spec, torch.Generator().manual_seed(42))
    c = augment(batch, spec, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_output_shape_and_dtype_grayscale():
    batch = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    out = augment(batch, view_spec("small", size=20), torch.Generator().manual_seed(0))
    assert out.shape == (5, 1, 20, 20)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # normalised with mean 0.5 / std 0.25: values lie in [-2, 2]
    assert out.min() >= -2 - 1e-5 and out.max() <= 2 + 1e-5
    assert out.std() > 0.1
    # the input is not modified in place
    assert batch.dtype == torch.uint8


def test_rgb_input_and_grayscale_branch():
    batch = _batch_of_copies(4, channels=3)
    out = augment(batch, view_spec("moco_v2", size=20), torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 20, 20) and out.dtype == torch.float32
    always_gray = ViewSpec(**{**NO_AUG, "grayscale_p": 1.0})
    gray = augment(batch, always_gray, torch.Generator().manual_seed(0))
    torch.testing.assert_close(gray[:, 0], gray[:, 1])
    torch.testing.assert_close(gray[:, 0], gray[:, 2])
    # luma weights of ITU-R 601 on the scaled input
    x = batch.float() / 255
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(gray[:, 0], (luma - 0.5) / 0.25, atol=1e-5, rtol=0)


def test_rgb_saturation_scales_distance_to_gray_per_image():
    # mid-range colours so no factor in [0, 2] clips
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(100, 156, (6, 3, 12, 12), dtype=torch.uint8, generator=g)
    spec = ViewSpec(**{**NO_AUG, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 1.0})
    out = augment(batch, spec, torch.Generator().manual_seed(3)) * 0.25 + 0.5
    x = batch.float() / 255
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    factors = []
    for i in range(len(x)):
        d_in, d_out = (x[i] - gray[i]).flatten(), (out[i] - gray[i]).flatten()
        f = float(d_out @ d_in / (d_in @ d_in))
        torch.testing.assert_close(d_out, f * d_in, atol=1e-5, rtol=0)
        factors.append(f)
    assert all(0.0 <= f <= 2.0 for f in factors)
    assert max(factors) - min(factors) > 0.1  # per-image factors, not one for the batch


@pytest.mark.parametrize("channels", [1, 3])
def test_no_augmentation_is_to_input(channels):
    batch = torch.randint(0, 256, (4, channels, 16, 16), dtype=torch.uint8)
    spec = ViewSpec(**NO_AUG)
    out = augment(batch, spec, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, to_input(batch, spec), atol=1e-5, rtol=0)


def test_flip_is_horizontal_mirror():
    batch = _batch_of_copies(3)
    spec = ViewSpec(**{**NO_AUG, "flip_p": 1.0})
    out = augment(batch, spec, torch.Generator().manual_seed(0))
    expected = to_input(batch, spec).flip(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (out - to_input(batch, spec)).abs().max() > 0.5  # the image really is asymmetric


def test_to_input_resizes_and_normalises():
    batch = torch.full((2, 1, 8, 8), 255, dtype=torch.uint8)
    out = to_input(batch, ViewSpec(size=16))
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, (1.0 - 0.5) / 0.25))


@pytest.mark.parametrize("kwargs", [dict(crop_scale=(0.0, 1.0)), dict(crop_scale=(0.8, 0.5)),
                                    dict(crop_scale=(0.5, 1.2)), dict(flip_p=1.5),
                                    dict(jitter_p=-0.1), dict(blur_p=1.5), dict(grayscale_p=2.0)])
def test_invalid_spec_raises(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ViewSpec(**kwargs)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown view preset") as info:
        view_spec("nope")
    for name in PRESETS:
        assert name in str(info.value)
    assert view_spec("digits", size=12).size == 12
    assert view_spec("digits").flip_p == 0.0


def test_full_scale_crop_with_default_ratio_is_the_whole_image():
    """A box that cannot fit (area 1 with aspect != 1) is redrawn and then falls back to the whole
    image, as torchvision does, instead of being clamped to a smaller crop."""
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    spec = ViewSpec(crop_scale=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0)
    out = augment(images, spec, torch.Generator().manual_seed(0))
    assert torch.allclose(out, to_input(images, spec), atol=1e-5)


def test_crop_never_covers_less_than_min_scale():
    """With scale (0.9, 1) every crop is nearly the whole image: the view stays close to the
    input (a clamped box of area 0.9 * 0.75 would move pixels much further)."""
    images = _asymmetric_image().expand(64, -1, -1, -1).contiguous()
    spec = ViewSpec(crop_scale=(0.9, 1.0), flip_p=0.0, jitter_p=0.0, blur_p=0.0)
    out = augment(images, spec, torch.Generator().manual_seed(1))
    base = to_input(images, spec)
    assert (out - base).abs().mean() < 0.5 * base.abs().mean()


def test_blur_is_the_separable_gaussian_per_image():
    """A centred point through blur with sigma fixed at 1 becomes the outer product of the 3-tap
    normalised Gaussian (the kernel side at 20 px); blur_p decides per image, so at 0.5 a batch of
    identical points comes back part blurred, part untouched."""
    size, b = 20, 64
    point = torch.zeros(b, 1, size, size)
    point[:, :, size // 2, size // 2] = 1.0
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / 2)
    taps = taps / taps.sum()
    expected = torch.zeros(size, size)
    expected[size // 2 - 1:size // 2 + 2, size // 2 - 1:size // 2 + 2] = torch.outer(taps, taps)

    always = ViewSpec(size=size, blur_p=1.0, blur_sigma=(1.0, 1.0))
    out = gaussian_blur(point, always, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected.expand(b, 1, size, size))

    half = ViewSpec(size=size, blur_p=0.5, blur_sigma=(1.0, 1.0))
    out = gaussian_blur(point, half, torch.Generator().manual_seed(0))
    blurred = out[:, 0, size // 2, size // 2] < 1.0
    assert 10 < int(blurred.sum()) < b - 10
    torch.testing.assert_close(out[~blurred], point[~blurred])
    torch.testing.assert_close(out[blurred], expected.expand(int(blurred.sum()), 1, size, size))
