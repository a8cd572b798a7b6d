"""CPC: the row-causal context, the patch grid, the InfoNCE over the grid against a
loop over eq. 4, and training on digits (upsampled to 16 px for a 3 x 3 grid of 8 px patches)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.data.datasets import load_digits
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.evaluation.knn import knn_accuracy
from methods.registry import build_method
from methods.training import OptimConfig, encode, fit
from methods.zoo.cpc import RowContext, cpc_info_nce, patch_grid


def test_context_sees_only_rows_above_and_its_own():
    torch.manual_seed(0)
    context = RowContext(4, layers=2)
    z = torch.randn(2, 4, 6, 6)
    changed = z.clone()
    changed[:, :, 3] += 5.0  # row 3 only
    a, b = context(z), context(changed)
    assert torch.allclose(a[:, :, :3], b[:, :, :3])  # rows above are blind to row 3
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])


def test_patch_grid_geometry():
    x = torch.arange(2 * 28 * 28, dtype=torch.float).view(2, 1, 28, 28)
    grid = patch_grid(x, 8, 4)
    assert grid.shape == (2, 6, 6, 1, 8, 8)
    assert torch.equal(grid[1, 2, 3, 0], x[1, 0, 8:16, 12:20])
    m = build_method("cpc", build_backbone("convnet", 1, 32), view_spec("small", size=32))
    assert m.geometry(32) == (8, 4, 7)  # the paper's 7 x 7 grid, as 64 px at stride 32 on 256
    with pytest.raises(ValueError, match="method.prediction_steps=3 .* 8 px images"):
        m.geometry(8)


def test_cpc_info_nce_matches_a_loop_over_the_equation():
    g = torch.Generator().manual_seed(0)
    steps, b, grid, d, t = 2, 3, 4, 5, 0.1
    z = torch.randn(b, grid, grid, d, generator=g)
    pred = torch.randn(steps, b, grid, grid, d, generator=g)
    flat = F.normalize(z.reshape(-1, d), dim=1)
    per_step = []
    for k in range(1, steps + 1):
        terms = []
        for i in range(b):
            for r in range(grid - k):
                for c in range(grid):
                    scores = flat @ F.normalize(pred[k - 1, i, r, c], dim=0) / t
                    positive = i * grid * grid + (r + k) * grid + c
                    terms.append(-(scores[positive] - torch.logsumexp(scores, 0)))
        per_step.append(torch.stack(terms).mean())
    expected = torch.stack(per_step).mean()
    torch.testing.assert_close(cpc_info_nce(pred, z, steps, t), expected)


def test_cpc_learns_on_digits():
    torch.set_num_threads(1)
    tr, te = load_digits("train"), load_digits("test")
    torch.manual_seed(0)
    m = build_method("cpc", build_backbone("convnet", 1, 8), view_spec("digits"),
                     prediction_steps=2, image_size=16)

    def knn() -> float:
        return knn_accuracy(encode(m.embed, tr.images, m), tr.labels.numpy(),
                            encode(m.embed, te.images, m), te.labels.numpy())

    before = knn()
    history = fit(m, tr, epochs=2, batch_size=64, optim=OptimConfig(lr=0.05))
    assert history[-1]["loss"] < history[0]["loss"]
    after = knn()  # measured: 0.827 -> 0.902
    assert after > before + 0.03, f"kNN {before:.3f} -> {after:.3f}"
