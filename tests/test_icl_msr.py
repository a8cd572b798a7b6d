"""ICL-MSR (unofficial): L_uni against its formula, the meta gradient against finite
differences, the first-order option against the exact one, and lambda = gamma = 0 reducing to
the base method."""

from __future__ import annotations

import math

import pytest
import torch

from methods.base import Batch
from methods.data.datasets import load_digits
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.losses.uniformity import uniformity
from methods.registry import build_method
from methods.training import OptimConfig, fit, make_optimizer
from methods.zoo.icl_msr import ICLMSR, semantic_loss

LAMBDA, ALPHA, GAMMA = 0.5, 0.1, 0.1


def test_uniformity_matches_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, generator=g)
    t = 2.0
    expected = 0.0
    for row in torch.nn.functional.normalize(a, dim=2):
        terms = [math.exp(2 * t * float(row[i] @ row[j]) - 2 * t)
                 for i in range(4) for j in range(4) if i != j]
        expected += math.log(sum(terms) / len(terms))
    assert uniformity(a, t).item() == pytest.approx(expected / 3, rel=1e-6)
    # identical vectors are the worst case (0); spread ones score lower
    assert uniformity(torch.ones(1, 3, 5)).item() == pytest.approx(0.0, abs=1e-6)
    assert uniformity(torch.eye(3).unsqueeze(0)).item() < -1
    with pytest.raises(ValueError, match="at least 2"):
        uniformity(torch.randn(2, 1, 4))


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _tiny(second_order: bool = True, lambda_: float = LAMBDA) -> tuple[ICLMSR, Batch]:
    torch.manual_seed(0)
    m = build_method("simclr", build_backbone("convnet", 1, 8), view_spec("digits"), seed=3,
                     regularizer="icl_msr", proj_hidden_dim=32, proj_dim=16, lambda_=lambda_,
                     alpha=ALPHA, gamma=GAMMA, num_semantics=3, second_order=second_order)
    digits = load_digits("train")
    idx = torch.arange(16)
    return m, Batch(idx, digits.images[idx], digits.labels[idx])


def _loss_to(m: ICLMSR, batch: Batch, phi: dict[str, torch.Tensor]):
    """L_to at phi, built as training_step builds it, from the generator state ``m`` has."""
    h0, h1 = m.base.pair_features(batch)
    state = m.generator.get_state()
    loss_ct = m.base.pair_loss(h0, h1, batch, None, record=False)[0]
    weights = m.semantics(batch.images, phi)
    m.generator.set_state(state)
    return loss_ct + m.lambda_ * semantic_loss(m.base, h0, h1, weights, batch, None), weights


def _meta_objective(m: ICLMSR, batch: Batch, phi: dict[str, torch.Tensor], start) -> float:
    """L_ct(theta - alpha grad_theta L_to(theta, phi)) + gamma L_uni(phi), evaluated plainly."""
    m.generator.set_state(start)
    loss_to, weights = _loss_to(m, batch, phi)
    theta = {k: p for k, p in m.base.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss_to, list(theta.values()))
    virtual = {k: (p - ALPHA * g).detach() for (k, p), g in zip(theta.items(), grads, strict=True)}
    m.generator.set_state(start)
    with torch.no_grad():
        loss = m._at(virtual)(batch, None, None)  # noqa: SLF001
    return float(loss + GAMMA * uniformity(weights.detach(), m.uniformity_t))


def test_meta_gradient_matches_finite_differences(float64):
    m, batch = _tiny(second_order=True)
    start = m.generator.get_state()
    phi = {k: p.detach().clone().requires_grad_() for k, p in m.f_msr.named_parameters()}
    loss_to, weights = _loss_to(m, batch, phi)
    m.generator.set_state(start)
    got = dict(zip(phi, m.meta_gradient(batch, None, loss_to, weights, phi), strict=True))
    names = list(phi)
    checked = 0
    for name, flat_index in [(names[0], 0), (names[0], 7), (names[-2], 3), (names[-2], 40),
                             (names[-1], 2)]:
        step = 1e-5
        values = []
        for sign in (1, -1):
            shifted = {k: v.detach().clone() for k, v in phi.items()}
            shifted[name].view(-1)[flat_index] += sign * step
            values.append(_meta_objective(m, batch, shifted, start))
        numeric = (values[0] - values[1]) / (2 * step)
        analytic = got[name].view(-1)[flat_index].item()
        assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-9), (name, flat_index)
        checked += abs(analytic) > 1e-8
    assert checked >= 3  # the gradients compared are not all zero


def test_first_order_option_approximates_second_order(float64):
    results = []
    for second_order in (True, False):
        m, batch = _tiny(second_order)
        start = m.generator.get_state()
        phi = {k: p.detach().clone().requires_grad_() for k, p in m.f_msr.named_parameters()}
        loss_to, weights = _loss_to(m, batch, phi)
        m.generator.set_state(start)
        results.append(torch.cat([g.reshape(-1) for g in
                                  m.meta_gradient(batch, None, loss_to, weights, phi)]))
    exact, approx = results
    cosine = torch.nn.functional.cosine_similarity(exact, approx, dim=0).item()
    assert cosine > 0.999, cosine
    assert ((approx - exact).norm() / exact.norm()).item() < 0.02


def test_training_step_updates_f_msr_but_trainer_does_not():
    m, batch = _tiny()
    trained = {id(p) for group in make_optimizer(m, OptimConfig(), 1, 1)[0].param_groups
               for p in group["params"]}
    assert not any(id(p) in trained for p in m.f_msr.parameters())
    assert all(id(p) in trained for p in m.base.parameters() if p.requires_grad)
    before = [p.clone() for p in m.f_msr.parameters()]
    running_mean = m.base.projection[1].running_mean.clone()
    loss, metrics = m.training_step(batch)
    loss.backward()
    assert {"loss_ct", "loss_msr", "loss_uni"} <= set(metrics)
    assert loss.item() == pytest.approx(metrics["loss_ct"] + LAMBDA * metrics["loss_msr"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.f_msr.parameters(), strict=True))
    # the extra (semantic and virtual) passes leave the head's BatchNorm statistics as one pass does
    reference, _ = _tiny()
    ref_loss, _ = reference.base.training_step(batch)
    torch.testing.assert_close(m.base.projection[1].running_mean,
                               reference.base.projection[1].running_mean)
    assert not torch.equal(running_mean, m.base.projection[1].running_mean)


@pytest.mark.parametrize("base,extra", [("simclr", {}), ("moco", {"queue_size": 128})])
def test_zero_lambda_and_gamma_train_exactly_like_the_base(base, extra):
    torch.set_num_threads(1)
    data = load_digits("train").subset(torch.arange(256))
    runs = []
    for regularizer in ({}, {"regularizer": "icl_msr", "lambda_": 0.0, "gamma": 0.0}):
        torch.manual_seed(0)
        m = build_method(base, build_backbone("convnet", 1, 8), view_spec("digits"),
                         proj_hidden_dim=64, **extra, **regularizer)
        history = fit(m, data, epochs=2, batch_size=64, optim=OptimConfig(lr=0.05))
        runs.append((history, m.backbone.state_dict()))
    (h_base, w_base), (h_icl, w_icl) = runs
    assert [h["loss"] for h in h_icl] == pytest.approx([h["loss"] for h in h_base], rel=1e-6)
    for key in w_base:
        torch.testing.assert_close(w_icl[key], w_base[key], rtol=1e-5, atol=1e-6)


def test_regularizer_errors():
    backbone = build_backbone("convnet", 1, 8)
    with pytest.raises(ValueError, match="two-view method"):
        build_method("selfcon", backbone, view_spec("digits"), regularizer="icl_msr")
    with pytest.raises(ValueError, match="unknown regularizer"):
        build_method("simclr", backbone, view_spec("digits"), regularizer="msr")
    with pytest.raises(ValueError, match="num_semantics"):
        build_method("simclr", backbone, view_spec("digits"), regularizer="icl_msr", num_semantics=1)
    with pytest.raises(ValueError, match="no hyperparameter lambda_"):
        build_method("simclr", backbone, view_spec("digits"), lambda_=0.1)
