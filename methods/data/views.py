"""Augmentation of whole uint8 batches with independent random parameters for every image.

Why not torchvision.transforms.v2 on a batch: applied to a ``[B, C, H, W]`` tensor it draws one
parameter set and crops every image of the batch identically, which silently removes most of the
variation contrastive learning relies on. Why not per-image PIL in a DataLoader: on a 2-core
machine it is many times slower than the vectorised path below (``benchmarks/throughput.py``;
figures in benchmarks/RESULTS.md).

Crop and flip are one ``affine_grid`` + ``grid_sample`` call for the batch; colour jitter is
per-image factors broadcast over pixels; blur is a grouped separable convolution with one kernel
per image. Hue jitter is not implemented (it needs an RGB->HSV round trip and most of our data is
grayscale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """One augmentation pipeline. Factors follow torchvision's ``ColorJitter`` conventions."""

    size: int | None = None  # output side; None keeps the input's
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")


# Paper pipelines. SimCLR (Chen et al. 2020, appendix A), MoCo v2 (Chen et al. 2020b, "aug+").
PRESETS: dict[str, ViewSpec] = {
    "simclr": ViewSpec(crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8),
    "moco_v2": ViewSpec(crop_scale=(0.2, 1.0)),
    "moco_v1": ViewSpec(crop_scale=(0.2, 1.0), jitter_p=1.0, blur_p=0.0),
    # Small grayscale images (Fashion-MNIST, digits): milder crops, no blur on 8..28 px.
    "small": ViewSpec(crop_scale=(0.3, 1.0), blur_p=0.0),
    # 8x8 digits: a flip changes a digit's meaning and a small crop leaves a few pixels.
    "digits": ViewSpec(crop_scale=(0.7, 1.0), flip_p=0.0, blur_p=0.0),
}


def view_spec(name: str, **overrides) -> ViewSpec:
    """A named preset with some fields replaced, e.g. ``view_spec("moco_v2", size=28)``."""
    if name not in PRESETS:
        raise ValueError(f"unknown view preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def crop_and_flip(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Random resized crop + horizontal flip of every image, each with its own box.

    The box covers ``area`` of the image with aspect ``ratio``; in ``affine_grid``'s normalised
    coordinates it is the scale ``(w, h)`` and the shift ``(cx, cy)`` of the sampling grid.
    """
    b, c = x.shape[:2]
    size = spec.size or x.shape[-1]
    # As torchvision: redraw boxes that do not fit in the image (up to 10 tries), then fall back
    # to the whole image, so the crop never covers less than crop_scale asks.
    w, h = torch.ones(b), torch.ones(b)
    todo = torch.ones(b, dtype=torch.bool)
    for _ in range(10):
        area = _uniform(b, *spec.crop_scale, generator)
        ratio = _uniform(b, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1]), generator).exp()
        new_w, new_h = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = todo & (new_w <= 1) & (new_h <= 1)
        w, h = torch.where(fits, new_w, w), torch.where(fits, new_h, h)
        todo &= ~fits
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(_bernoulli(b, spec.flip_p, generator), -1.0, 1.0)
    zeros = torch.zeros(b)
    theta = torch.stack([torch.stack([w * flip, zeros, cx], 1), torch.stack([zeros, h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, c, size, size], align_corners=False)
    # bilinear sampling reads 4 pixels per output pixel: a box over more than twice the output's
    # side would alias, so each image is sampled from the level of an antialiased pyramid at
    # which its box spans between one and two output sides (a mipmap)
    levels = (torch.minimum(w, h) * x.shape[-1] / size).log2().floor().clamp(min=0).long()
    out = x.new_empty(b, c, size, size)
    for level in levels.unique().tolist():
        rows = (levels == level).nonzero().flatten().to(x.device)
        source = x[rows]
        if level:
            side = max(size, x.shape[-1] >> level)
            source = F.interpolate(source, size=(side, side), mode="bilinear", antialias=True,
                                   align_corners=False)
        out[rows] = F.grid_sample(source, grid[rows], mode="bilinear", padding_mode="reflection",
                                  align_corners=False)
    return out


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and (for RGB) saturation, each with a per-image factor.

    Images not selected by ``jitter_p`` get factor 1, so the whole batch takes one code path.
    """
    b = x.shape[0]
    apply = _bernoulli(b, spec.jitter_p, generator)

    def factor(strength: float) -> torch.Tensor:
        f = _uniform(b, max(0.0, 1 - strength), 1 + strength, generator)
        return torch.where(apply, f, torch.ones(b)).to(x.device, x.dtype).view(b, 1, 1, 1)

    x = (x * factor(spec.brightness)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * factor(spec.contrast) + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(x)
        x = ((x - gray) * factor(spec.saturation) + gray).clamp(0, 1)
    return x


def random_grayscale(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None) -> torch.Tensor:
    if x.shape[1] != 3 or spec.grayscale_p == 0:
        return x
    mask = _bernoulli(x.shape[0], spec.grayscale_p, generator).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Per-image Gaussian blur, kernel side ~10% of the image as in SimCLR, as a grouped conv."""
    if spec.blur_p == 0:
        return x
    b, c, height, width = x.shape
    k = max(3, int(0.1 * height) // 2 * 2 + 1)
    sigma = _uniform(b, *spec.blur_sigma, generator).to(x.device, x.dtype)
    taps = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    kernel = torch.exp(-(taps.view(1, k) ** 2) / (2 * sigma.view(b, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = F.one_hot(torch.tensor(k // 2), k).to(x.device, x.dtype).expand(b, k)
    apply = _bernoulli(b, spec.blur_p, generator).to(x.device).view(b, 1)
    kernel = torch.where(apply, kernel, identity).repeat_interleave(c, 0)  # [B*C, k]
    flat = F.pad(x.reshape(1, b * c, height, width), (k // 2,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel.view(b * c, 1, k, 1), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, k), groups=b * c)
    return flat.view(b, c, height, width)


def augment(images: torch.Tensor, spec: ViewSpec, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """One random view of every image: uint8 ``[B, C, H, W]`` -> normalised float ``[B, C, S, S]``.

    Parameters are drawn on the CPU from ``generator`` (so a seed fixes them on any device) and
    the pixel work runs on ``images.device``.
    """
    x = images.to(torch.get_default_dtype()).div_(255.0)  # float32 unless a test asks for float64
    x = crop_and_flip(x, spec, generator)
    x = color_jitter(x, spec, generator)
    x = random_grayscale(x, spec, generator)
    x = gaussian_blur(x, spec, generator)
    return (x - spec.mean) / spec.std


def to_input(images: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    """The un-augmented network input for evaluation and clustering: scale, resize, normalise."""
    x = images.to(torch.get_default_dtype()).div_(255.0)  # float32 unless a test asks for float64
    if spec.size and spec.size != x.shape[-1]:
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True,
                          align_corners=False)
    return (x - spec.mean) / spec.std


def local_view_spec(spec: ViewSpec, size: int) -> ViewSpec:
    """Multi-crop's small views (SwAV, Caron et al. 2020, sec. 3.2): ``size`` px crops of a small
    area, below the global views' smallest crop (the paper: 96 px at 5-14% beside 224 px at
    14-100%)."""
    return replace(spec, size=size, crop_scale=(0.05, max(0.05, spec.crop_scale[0])))


def local_size(image_size: int, ratio: float) -> int:
    """Side of the local crops: ``ratio`` of the global side (96 / 224 in the papers), at least
    8 px (the ConvNet max-pools three times)."""
    return max(8, round(image_size * ratio))


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65 white) of sRGB images in [0, 1], ``[B, 3, H, W]`` -> L in [0, 100], a and b
    roughly in [-128, 127]. The sRGB transfer curve and XYZ matrix are IEC 61966-2-1's."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    matrix = rgb.new_tensor([[0.4124564, 0.3575761, 0.1804375],
                             [0.2126729, 0.7151522, 0.0721750],
                             [0.0193339, 0.1191920, 0.9503041]])
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    xyz = xyz / rgb.new_tensor([0.95047, 1.0, 1.08883]).view(1, 3, 1, 1)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def gradient_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of ``[B, 1, H, W]`` images (CMC's second view for grayscale)."""
    kx = gray.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # [2, 1, 3, 3]
    g = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return g.pow(2).sum(1, keepdim=True).add(1e-12).sqrt()


def split_views(x: torch.Tensor, spec: ViewSpec) -> list[torch.Tensor]:
    """CMC's views of one normalised network input: L vs ab for RGB, intensity vs gradient
    magnitude for grayscale; each re-centred to a similar scale."""
    pixels = x * spec.std + spec.mean  # back to [0, 1]
    if x.shape[1] == 3:
        lab = rgb_to_lab(pixels.clamp(0, 1))
        return [(lab[:, :1] - 50) / 50, lab[:, 1:] / 64]
    grad = gradient_magnitude(pixels)
    return [x, (grad - grad.mean()) / (grad.std() + 1e-6)]
