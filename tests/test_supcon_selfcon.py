"""SupCon and SelfCon: the losses against lightly / a loop over the paper's equation, the
multi-exit encoder, and short trainings on digits; the cross-entropy reference line beside them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from methods.base import Batch
from methods.data.datasets import load_digits
from methods.data.views import view_spec
from methods.encoders.backbones import MultiExit, build_backbone
from methods.evaluation.knn import knn_accuracy
from methods.losses.supervised import selfcon, supcon
from methods.registry import build_method
from methods.training import OptimConfig, encode, fit


def _supcon_loop(feats, labels, t, base_t, anchors_views, sum_inside_log=False):
    """Khosla et al. eq. 2 (L_out) / the sum-inside variant, one anchor at a time."""
    b, v, _ = feats.shape
    z = F.normalize(feats, dim=2)
    items = [(i, j) for j in range(v) for i in range(b)]
    total, count = 0.0, 0
    for i, j in items:
        if j >= anchors_views:
            continue
        count += 1
        others = [(p, q) for p, q in items if (p, q) != (i, j)]
        sim = {o: math.exp(float(z[i, j] @ z[o]) / t) for o in others}
        denom = sum(sim.values())
        pos = [o for o in others if labels[o[0]] == labels[i]]
        if not pos:
            continue
        if sum_inside_log:
            total += -math.log(sum(sim[o] for o in pos) / denom)
        else:
            total += -sum(math.log(sim[o] / denom) for o in pos) / len(pos)
    return (t / base_t) * total / count


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_without_labels_is_lightly_ntxent(temperature):
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    got = supcon(torch.stack([z0, z1], 1), None, temperature, base_temperature=temperature)
    torch.testing.assert_close(got, NTXentLoss(temperature=temperature)(z0, z1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,inside", [("all", False), ("one", False), ("all", True)])
def test_supcon_matches_equation_with_labels(mode, inside):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(10, 2, 8, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 0])
    got = supcon(feats, labels, 0.1, 0.07, mode, inside)
    expected = _supcon_loop(feats, labels.tolist(), 0.1, 0.07, 2 if mode == "all" else 1, inside)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # labels matter: the same features with every image its own class give another value
    assert abs(supcon(feats, None, 0.1, 0.07, mode, inside).item() - expected) > 1e-3


def test_supcon_anchor_without_positive_contributes_zero():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 1, 8, generator=g)  # one view: image 5's label is unique
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    for inside in (False, True):
        got = supcon(feats, labels, 0.2, 0.2, sum_inside_log=inside)
        assert torch.isfinite(got)
        assert got.item() == pytest.approx(_supcon_loop(feats, labels.tolist(), 0.2, 0.2, 1, inside),
                                           rel=1e-5)


def test_supcon_rejects_bad_input():
    with pytest.raises(ValueError, match="contrast_mode"):
        supcon(torch.randn(4, 2, 3), None, contrast_mode="both")
    with pytest.raises(ValueError, match=r"\[batch, views, dim\]"):
        supcon(torch.randn(4, 3))


def test_selfcon_matches_equation_2():
    """SelfCon-S: exits [sub, backbone] of one view; every output an anchor, positives all
    same-label outputs at any exit (without labels: the same image's other exit)."""
    g = torch.Generator().manual_seed(3)
    sub, backbone = torch.randn(8, 1, 6, generator=g), torch.randn(8, 1, 6, generator=g)
    labels = torch.tensor([0, 1, 1, 2, 0, 2, 3, 1])
    t, base_t = 0.1, 0.07
    z = F.normalize(torch.cat([sub, backbone], 1), dim=2)  # [B, 2, D]
    outputs = [(i, e) for e in range(2) for i in range(8)]
    for lab in (labels, None):
        ids = labels.tolist() if lab is not None else list(range(8))
        total = 0.0
        for a in outputs:
            others = [o for o in outputs if o != a]
            denom = sum(math.exp(float(z[a] @ z[o]) / t) for o in others)
            pos = [o for o in others if ids[o[0]] == ids[a[0]]]
            total += -sum(float(z[a] @ z[o]) / t - math.log(denom) for o in pos) / len(pos)
        expected = (t / base_t) * total / len(outputs)
        assert selfcon([sub, backbone], lab, t, base_t).item() == pytest.approx(expected, rel=1e-5)


def test_selfcon_m_without_labels_trains_its_reference_objective():
    """Unlabelled SelfCon-M as the reference runs it (the other view a negative) has no
    cross-view positive, so it is not expected to beat a random encoder's kNN; it trains: the
    loss falls and stays finite."""
    torch.set_num_threads(1)
    tr = load_digits("train")
    torch.manual_seed(0)
    m = build_method("selfcon", build_backbone("convnet", 1, 8), view_spec("digits"),
                     proj_hidden_dim=128, multi_view=True, supervised=False, temperature=0.5,
                     base_temperature=0.5)
    history = fit(m, tr, epochs=2, batch_size=64, optim=OptimConfig(lr=0.05))
    assert history[-1]["loss"] < history[0]["loss"] and math.isfinite(history[-1]["loss"])


def test_selfcon_m_without_labels_makes_the_other_view_a_negative():
    """SelfCon-M unlabelled, written out over every (image, view, exit) output: the positives of
    an output are the same image's same view at the other exit; its other view is a negative, as
    in the reference code (before: a positive)."""
    g = torch.Generator().manual_seed(4)
    sub, backbone = torch.randn(6, 2, 5, generator=g), torch.randn(6, 2, 5, generator=g)  # [B, V, D]
    t, base_t = 0.2, 0.2
    z = {(i, v, e): F.normalize(x[i, v], dim=0) for e, x in enumerate((sub, backbone))
         for i in range(6) for v in range(2)}
    total = 0.0
    for a in z:
        others = [o for o in z if o != a]
        denom = sum(math.exp(float(z[a] @ z[o]) / t) for o in others)
        pos = [o for o in others if o[:2] == a[:2]]  # same image, same view, other exit
        total += -sum(float(z[a] @ z[o]) / t - math.log(denom) for o in pos) / len(pos)
    expected = (t / base_t) * total / len(z)
    assert selfcon([sub, backbone], None, t, base_t).item() == pytest.approx(expected, rel=1e-5)


def test_multi_exit_branches_and_matches_backbone():
    torch.manual_seed(0)
    net = build_backbone("convnet", 1, 28)
    wrapped = MultiExit(net, branch_after=2).eval()
    x = torch.randn(3, 1, 28, 28)
    h, h_sub = wrapped(x)
    torch.testing.assert_close(h, net.eval()(x))  # the backbone exit is the plain backbone
    assert h_sub.shape == h.shape == (3, 256)
    same = MultiExit(net, 2, "same")
    assert sum(p.numel() for p in same.sub.parameters()) > sum(p.numel() for p in wrapped.sub.parameters())
    for bad in (0, 4):
        with pytest.raises(ValueError, match="branch_after"):
            MultiExit(net, branch_after=bad)
    with pytest.raises(ValueError, match="sub_network"):
        MultiExit(net, 2, "tiny")
    r18 = MultiExit(build_backbone("resnet18", 3, 32), 2)
    assert r18.sub[-1].in_features == 128


def _images_through_backbone(name: str, **hparams) -> int:
    digits = load_digits("train")
    m = build_method(name, build_backbone("convnet", 1, 8), view_spec("digits"), **hparams)
    seen = []
    m.backbone.stages[0].register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    idx = torch.arange(32)
    m.training_step(Batch(idx, digits.images[idx], digits.labels[idx]))
    return sum(seen)


def test_selfcon_s_passes_each_image_through_the_backbone_once():
    assert _images_through_backbone("selfcon") == 32
    assert _images_through_backbone("selfcon", multi_view=True) == 64
    assert _images_through_backbone("supcon") == 64


@pytest.mark.parametrize("name", ["supcon", "supervised"])
def test_supervised_methods_reject_unlabelled_batches(name):
    digits = load_digits("train")
    m = build_method(name, build_backbone("convnet", 1, 8), view_spec("digits"))
    idx = torch.arange(8)
    with pytest.raises(ValueError, match="method.supervised"):
        m.training_step(Batch(idx, digits.images[idx], torch.full((8,), -1)))


def test_cross_entropy_reference_rejects_labels_beyond_its_classes():
    digits = load_digits("train")
    idx = torch.arange(8)
    with pytest.raises(ValueError, match="method.num_classes"):
        build_method("supervised", build_backbone("convnet", 1, 8), view_spec("digits"), num_classes=1)
    m = build_method("supervised", build_backbone("convnet", 1, 8), view_spec("digits"), num_classes=5)
    with pytest.raises(ValueError, match="method.num_classes is 5"):
        m.training_step(Batch(idx, digits.images[idx], torch.arange(8)))


def _knn(m, tr, te) -> float:
    """kNN accuracy of ``m``'s backbone features, digits' train split as the bank."""
    return knn_accuracy(encode(m.embed, tr.images, m), tr.labels.numpy(),
                        encode(m.embed, te.images, m), te.labels.numpy())


def test_cross_entropy_reference_learns_the_labels():
    """Two epochs on digits: the classifier fits the training labels and the backbone's kNN rises."""
    torch.set_num_threads(1)
    tr, te = load_digits("train"), load_digits("test")
    torch.manual_seed(0)
    m = build_method("supervised", build_backbone("convnet", 1, 8), view_spec("digits"))
    before = _knn(m, tr, te)
    history = fit(m, tr, epochs=2, batch_size=64, optim=OptimConfig(lr=0.05))
    after = _knn(m, tr, te)
    assert history[-1]["train_accuracy"] > 0.8, history[-1]
    assert history[-1]["loss_ce"] < history[0]["loss_ce"]
    assert after > before + 0.03, f"kNN {before:.3f} -> {after:.3f}"


@pytest.mark.parametrize("name,hparams", [
    ("supcon", {}), ("supcon", {"supervised": False}),
    ("selfcon", {}), ("selfcon", {"multi_view": True})])
def test_training_beats_random_encoder(name, hparams):
    torch.set_num_threads(1)
    tr, te = load_digits("train"), load_digits("test")
    torch.manual_seed(0)
    m = build_method(name, build_backbone("convnet", 1, 8), view_spec("digits"),
                     proj_hidden_dim=128, **hparams)
    before = _knn(m, tr, te)
    # SelfCon-S sees one view per step (half SupCon's compute): it gets 4 epochs to SupCon's 2
    epochs = 4 if name == "selfcon" else 2
    fit(m, tr, epochs=epochs, batch_size=64, optim=OptimConfig(lr=0.05))
    after = _knn(m, tr, te)
    assert after > before + 0.03, f"{name} {hparams}: kNN {before:.3f} -> {after:.3f}"
    if name == "selfcon":
        exits = m.exit_embeds(torch.zeros(2, 1, 8, 8))
        assert set(exits) == {"backbone", "sub"}
