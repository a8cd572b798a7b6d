"""ICL-MSR: invariant contrastive learning with a meta semantic regularizer (Qiang et al., ICML
2022). UNOFFICIAL: no public code exists; this follows the paper's description.

A small conv net f_msr reads the (un-augmented) image and proposes n channel weightings
A_s = [a_1 .. a_n] of the encoder's c feature channels. Reweighting the pooled feature by a_t is
the same as pooling a_t (.) Z, since mean pooling is linear, so each "semantic" costs one head
pass, not a backbone pass. The backdoor adjustment averages the base method's pair loss over the
n semantics with P(Z_s^t) = 1/n:

    L_msr = 1/n sum_t L_ct(a_t (.) h_0, a_t (.) h_1)        L_to = L_ct + lambda * L_msr

Encoder and heads (theta) take an ordinary step on L_to. f_msr (phi) takes a meta step: a virtual
update theta' = theta - alpha * grad_theta L_to(theta, phi), then phi descends
L_ct(theta') + gamma * L_uni(A_s). L_ct does not depend on phi except through theta', so the meta
gradient is second order; ``second_order=False`` replaces the Hessian-vector product with the
central finite difference of DARTS (Liu et al. 2019, eq. 8), which needs first derivatives only.

f_msr's parameters have ``requires_grad=False`` so the trainer's optimiser and DDP leave them
alone; its own Adam steps them here, with gradients averaged across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call

from methods.base import Batch, DevicePrototypes, Method
from methods.data.views import to_input
from methods.losses.uniformity import uniformity


def semantic_regularizer(in_channels: int, channels: int, num_semantics: int) -> nn.Sequential:
    """f_msr: two strided convs, global pooling, a linear map to n x c logits. No BatchNorm, so
    the virtual (functional) passes have no running statistics to disturb."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_semantics * channels))


class _PairObjective(nn.Module):
    """The base method's loss as a module ``forward``, so ``functional_call`` can evaluate it at
    virtual weights."""

    def __init__(self, base: Method):
        super().__init__()
        self.base = base

    def forward(self, batch: Batch, prototypes, weights: torch.Tensor | None = None,
                features: tuple[torch.Tensor, torch.Tensor] | None = None,
                features_only: bool = False):
        h0, h1 = features if features is not None else self.base.pair_features(batch)
        if features_only:
            return h0, h1
        if weights is None:
            return self.base.pair_loss(h0, h1, batch, prototypes, record=False)[0]
        return semantic_loss(self.base, h0, h1, weights, batch, prototypes)


def semantic_loss(base: Method, h0: torch.Tensor, h1: torch.Tensor, weights: torch.Tensor,
                  batch: Batch, prototypes: DevicePrototypes | None) -> torch.Tensor:
    """L_msr: the base pair loss under each channel weighting a_t, averaged (P(Z_s^t) = 1/n)."""
    state = base.generator.get_state()  # every semantic sees the same random draws
    total = h0.new_zeros(())
    for t in range(weights.shape[1]):
        base.generator.set_state(state)
        a = weights[:, t]  # [B, c]
        total = total + base.pair_loss(a * h0, a * h1, batch, prototypes, record=False)[0]
    return total / weights.shape[1]


@contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Replace parameters / buffers by (de-duplicated) name for the block, then put the originals
    back. A module reachable under two names is one object, so one swap covers both."""
    saved = []
    for name, value in tensors.items():
        path, _, attr = name.rpartition(".")
        owner = module.get_submodule(path)
        slots = owner._parameters if attr in owner._parameters else owner._buffers
        saved.append((slots, attr, slots[attr]))
        slots[attr] = value
    try:
        yield
    finally:
        for slots, attr, original in reversed(saved):
            slots[attr] = original


def _grad(output: torch.Tensor, inputs, **kwargs) -> list[torch.Tensor]:
    """``torch.autograd.grad`` with zeros for inputs the output does not depend on."""
    inputs = list(inputs)
    grads = torch.autograd.grad(output, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


class ICLMSR(Method):
    """Wraps a two-view base method (SimCLR, MoCo v2, PCL, SupCon) with the meta semantic
    regularizer. Checkpoints hold ``base.*`` and ``f_msr.*``."""

    name = "icl_msr"

    def __init__(self, base: Method, lambda_: float = 0.5, gamma: float = 0.1, alpha: float = 0.01,
                 num_semantics: int = 4, uniformity_t: float = 2.0, msr_lr: float = 1e-3,
                 second_order: bool = True):
        nn.Module.__init__(self)
        if not base.is_two_view():
            raise ValueError(f"method.regularizer: icl_msr needs a two-view method (simclr, moco, "
                             f"pcl, supcon); {base.name} is not one")
        if num_semantics < 2:
            raise ValueError(f"method.num_semantics must be >= 2 (got {num_semantics})")
        for key, value in (("lambda_", lambda_), ("gamma", gamma), ("alpha", alpha)):
            if value < 0:
                raise ValueError(f"method.{key} must be >= 0 (got {value})")
        if not (uniformity_t > 0 and msr_lr > 0):
            raise ValueError("method.uniformity_t and method.msr_lr must be > 0")
        self.base = base
        self.views, self.generator = base.views, base.generator
        self.schedule = base.schedule
        self.lambda_, self.gamma, self.alpha = lambda_, gamma, alpha
        self.uniformity_t, self.second_order = uniformity_t, second_order
        first_conv = next(m for m in base.backbone.modules() if isinstance(m, nn.Conv2d))
        self.f_msr = semantic_regularizer(first_conv.in_channels, base.backbone.feature_dim,
                                          num_semantics).requires_grad_(False)
        self.msr_lr = msr_lr
        self._msr_optimizer: torch.optim.Optimizer | None = None
        self._objective = [_PairObjective(base)]  # a list: not a second registration of base

    @property
    def backbone(self) -> nn.Module:
        return self.base.backbone

    def semantics(self, images: torch.Tensor, phi: dict[str, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """A_s ``[B, n, c]``: n channel weightings per image, each a softmax times c (mean 1, so
        a reweighted feature keeps the plain feature's scale)."""
        x = to_input(images, self.views)
        logits = functional_call(self.f_msr, phi, (x,)) if phi is not None else self.f_msr(x)
        c = self.base.backbone.feature_dim
        return c * logits.view(len(images), -1, c).softmax(dim=2)

    def training_step(self, batch: Batch, prototypes: DevicePrototypes | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        gen = self.generator
        before_views = gen.get_state()
        h0, h1 = self.base.pair_features(batch)
        self.expose(h0)
        before_loss = gen.get_state()
        loss_ct, metrics = self.base.pair_loss(h0, h1, batch, prototypes)
        after = gen.get_state()
        phi = {k: p.detach().clone().requires_grad_() for k, p in self.f_msr.named_parameters()}
        weights = self.semantics(batch.images, phi)
        gen.set_state(before_loss)
        # through functional_call on the real weights: gradients reach them, BatchNorm statistics
        # in the heads are not updated n more times
        loss_msr = self._at(self._theta())(batch, prototypes, weights, (h0, h1))
        loss = loss_ct + self.lambda_ * loss_msr
        loss_uni = uniformity(weights.detach(), self.uniformity_t)
        if self.training and torch.is_grad_enabled():
            gen.set_state(before_views)
            grads = self.meta_gradient(batch, prototypes, loss, weights, phi)
            self._apply_msr_step(grads)
        gen.set_state(after)
        return loss, {**metrics, "loss_ct": loss_ct.item(), "loss_msr": loss_msr.item(),
                      "loss_uni": loss_uni.item()}

    def _theta(self) -> dict[str, torch.Tensor]:
        return {k: p for k, p in self.base.named_parameters() if p.requires_grad}

    def _at(self, theta: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The base pair objective evaluated at weights ``theta``, with copies of the buffers so
        virtual passes leave BatchNorm's running statistics alone. (``functional_call`` is not
        used here: on MoCo, whose backbone is also registered as ``encoder_q.0``, torch 2.14
        left the virtual tensors in place of the real parameters afterwards.)"""
        tensors = {**theta, **{k: b.clone() for k, b in self.base.named_buffers()}}

        def objective(*args):
            with _swapped(self.base, tensors):
                return self._objective[0](*args)

        return objective

    def meta_gradient(self, batch: Batch, prototypes, loss_to: torch.Tensor, weights: torch.Tensor,
                      phi: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """d/dphi [L_ct(theta - alpha grad_theta L_to) + gamma L_uni]; the generator must be at
        the state the step's views were drawn from (the virtual pass redraws the same views)."""
        theta = self._theta()
        view_state = self.generator.get_state()
        grads = _grad(loss_to, theta.values(), retain_graph=True, create_graph=self.second_order)
        reg = self.gamma * uniformity(weights, self.uniformity_t)
        if self.second_order:
            virtual = {k: p - self.alpha * g for (k, p), g in zip(theta.items(), grads, strict=True)}
            meta = self._at(virtual)(batch, prototypes, None) + reg
            # retain: the trainer still back-propagates L_to, whose graph this one shares
            out = _grad(meta, phi.values(), retain_graph=True)
        else:
            virtual = {k: (p - self.alpha * g).detach().requires_grad_()
                       for (k, p), g in zip(theta.items(), grads, strict=True)}
            self.generator.set_state(view_state)
            g_virtual = _grad(self._at(virtual)(batch, prototypes, None), virtual.values())
            hvp = self._finite_difference(batch, prototypes, theta, g_virtual, phi, view_state)
            out = [a + b for a, b in zip(hvp, _grad(reg, phi.values(), retain_graph=True),
                                         strict=True)]
        self.generator.set_state(view_state)
        return out

    def _finite_difference(self, batch: Batch, prototypes, theta: dict[str, torch.Tensor],
                           direction: list[torch.Tensor], phi: dict[str, torch.Tensor],
                           view_state: torch.Tensor) -> list[torch.Tensor]:
        """-alpha * lambda * (d2 L_msr / dphi dtheta) v as (g(theta + eps v) - g(theta - eps v)) / 2eps,
        g = dL_msr/dphi (DARTS eq. 8). DARTS steps 0.01 / ||v||; on a ReLU + max-pool net a step that
        long crosses kinks and strays far from the exact gradient (benchmarks/RESULTS.md); 1e-4 does
        not."""
        norm = torch.sqrt(sum((d * d).sum() for d in direction))
        if self.lambda_ == 0 or norm == 0:
            return [torch.zeros_like(p) for p in phi.values()]
        eps = 1e-4 / norm
        sides = []
        for sign in (1.0, -1.0):
            objective = self._at({k: (p + sign * eps * d).detach()
                                  for (k, p), d in zip(theta.items(), direction, strict=True)})
            self.generator.set_state(view_state)
            with torch.no_grad():
                h = objective(batch, prototypes, None, None, True)
            msr = objective(batch, prototypes, self.semantics(batch.images, phi), h)
            sides.append(_grad(msr, phi.values()))
        scale = -self.alpha * self.lambda_ / (2 * eps)
        return [scale * (a - b) for a, b in zip(*sides, strict=True)]

    def _apply_msr_step(self, grads: list[torch.Tensor]) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            grads = [g.view_as(p) for g, p in zip(flat.split([g.numel() for g in grads]),
                                                  self.f_msr.parameters(), strict=True)]
        if self._msr_optimizer is None:
            self._msr_optimizer = torch.optim.Adam(self.f_msr.parameters(), lr=self.msr_lr)
        for p, g in zip(self.f_msr.parameters(), grads, strict=True):
            p.grad = g.detach()
        self._msr_optimizer.step()
        for p in self.f_msr.parameters():
            p.grad = None

    def on_step_end(self) -> None:
        self.base.on_step_end()

    def check_batch_size(self, batch_size: int) -> None:
        self.base.check_batch_size(batch_size)

    def nonfinite_advice(self) -> str:
        return f"{self.base.nonfinite_advice()}, or lower method.lambda_ / method.alpha"

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.embed(x)

    @torch.no_grad()
    def cluster_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.cluster_embed(x)
