"""PyTorch reference of the BP-CNN, PGD and Square (Linf), for benchmarks/attacks.py only.

Same algorithms as eqrobust.attacks (per-example masks, early stopping, per-example square
windows with sign redraws), written in eager PyTorch the way public implementations are.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_P_HALVING_ITERS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class TorchBPCNN(nn.Module):
    """conv -> BN -> ReLU -> 2x2 max pool per layer, then Linear; input NHWC in [0, 1]."""

    def __init__(self, in_shape, num_classes, channels=(32, 64), paddings=(1, 1), kernel_size=3):
        super().__init__()
        h, w, c = in_shape
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        for c_out, p in zip(channels, paddings, strict=True):
            self.convs.append(nn.Conv2d(c, c_out, kernel_size, padding=p))
            self.norms.append(nn.BatchNorm2d(c_out, eps=1e-5))
            c = c_out
            h, w = (h + 2 * p - kernel_size + 1) // 2, (w + 2 * p - kernel_size + 1) // 2
        self.head = nn.Linear(h * w * c, num_classes)
        self.register_buffer("mean", torch.zeros(in_shape[-1]))
        self.register_buffer("std", torch.ones(in_shape[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ((x - self.mean) / self.std).permute(0, 3, 1, 2)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = F.max_pool2d(F.relu(norm(conv(h))), 2)
        # Flatten in (H, W, C) order, like the JAX model.
        return self.head(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))


def load_from_nnx(tmodel: TorchBPCNN, state) -> TorchBPCNN:
    """Copies an eqrobust BPCNN's nnx state (pure dict of arrays) into the torch model."""

    def t(a):
        return torch.from_numpy(np.array(a, np.float32))

    with torch.no_grad():
        for i, (conv, norm) in enumerate(zip(tmodel.convs, tmodel.norms, strict=True)):
            conv.weight.copy_(t(state["convs"][i]["kernel"]).permute(3, 2, 0, 1))
            conv.bias.copy_(t(state["convs"][i]["bias"]))
            norm.weight.copy_(t(state["norms"][i]["scale"]))
            norm.bias.copy_(t(state["norms"][i]["bias"]))
            norm.running_mean.copy_(t(state["norms"][i]["mean"]))
            norm.running_var.copy_(t(state["norms"][i]["var"]))
        tmodel.head.weight.copy_(t(state["head"]["kernel"]).T)
        tmodel.head.bias.copy_(t(state["head"]["bias"]))
        tmodel.mean.copy_(t(state["mean"]))
        tmodel.std.copy_(t(state["std"]))
    return tmodel.eval()


def pgd_linf(model, x, y, *, eps, steps=20, step_size=None, generator=None):
    """Linf PGD with a random start; examples freeze once misclassified. Returns (x_adv, iters)."""
    step_size = eps / 8 if step_size is None else step_size
    noise = torch.rand(x.shape, generator=generator) * 2 - 1
    x_adv = (x + eps * noise).clamp(0, 1)
    active = torch.ones(x.shape[0], dtype=torch.bool)
    iters = torch.zeros(x.shape[0], dtype=torch.int32)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        active &= logits.argmax(1) == y
        if not bool(active.any()):
            break
        with torch.no_grad():
            x_new = torch.minimum(torch.maximum(x_adv + step_size * g.sign(), x - eps), x + eps)
            x_adv = torch.where(active[:, None, None, None], x_new.clamp(0, 1), x_adv)
        iters += active.int()
    with torch.no_grad():
        success = model(x_adv).argmax(1) != y
    return x_adv.detach(), success, iters


def _margin(logits, y):
    z_y = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], -math.inf).max(1).values
    return z_y - other


@torch.no_grad()
def square_linf(model, x, y, *, eps, queries=1000, p_init=0.8, generator=None, sign_draws=8):
    """Linf Square attack (margin loss, AutoAttack schedule, per-example windows)."""
    b, h, w, c = x.shape
    clean_ok = model(x).argmax(1) == y
    stripes = torch.randint(0, 2, (b, 1, w, c), generator=generator).float() * 2 - 1
    x_best = torch.where(clean_ok[:, None, None, None], (x + eps * stripes).clamp(0, 1), x)
    loss_min = _margin(model(x_best), y)
    q = clean_ok.int()
    active = clean_ok & (loss_min >= 0)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    for i in range(queries - 1):
        if not bool(active.any()):
            break
        p = p_init / 2 ** sum(i > t for t in _P_HALVING_ITERS)
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1)
        vh = torch.randint(0, h - s, (b,), generator=generator)[:, None, None]
        vw = torch.randint(0, w - s, (b,), generator=generator)[:, None, None]
        win = ((rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s))[..., None]
        signs = torch.randint(0, 2, (sign_draws, b, 1, 1, c), generator=generator).float() * 2 - 1
        cand = x_best + win * 2 * eps * signs
        cand = torch.minimum(torch.maximum(cand, x - eps), x + eps).clamp(0, 1)
        changed = (((cand - x_best).abs() >= 1e-7) & win).flatten(2).any(2)  # [D, B]
        first = torch.where(changed.any(0), changed.int().argmax(0), sign_draws - 1)
        x_new = cand[first, torch.arange(b)]
        l_new = _margin(model(x_new), y)
        improved = active & (l_new < loss_min)
        x_best = torch.where(improved[:, None, None, None], x_new, x_best)
        loss_min = torch.where(improved, l_new, loss_min)
        q += active.int()
        active &= loss_min >= 0
    success = model(x_best).argmax(1) != y
    return x_best, success, q


def standard_autoattack(model, norm: str, eps: float, n_classes: int = 10, seed: int = 0):
    """torchattacks' components chained as AutoAttack's standard version at its standard budget.

    APGD-CE, APGD-T (n_classes - 1 targets), FAB-T (likewise), each 100 iterations, then Square
    with 5000 queries, each on the points still correctly classified (torchattacks' MultiAttack
    logic). `torchattacks.AutoAttack(version="standard")` itself (3.5.1) leaves APGD, APGD-T and
    FAB at their class default of 10 iterations, a tenth of the budget (BUILD_NOTES, "Full-budget
    AutoAttack in the demo"). Returns run(x [B, C, H, W], y [B], log=None) -> x_adv; `log`, a
    list, receives (component, points attacked, seconds) per component.
    """
    import torchattacks  # the bench extra; only this function needs it

    n = {"linf": "Linf", "l2": "L2"}[norm.lower()]
    chain = [
        torchattacks.APGD(model, norm=n, eps=eps, steps=100, loss="ce", seed=seed),
        torchattacks.APGDT(model, norm=n, eps=eps, steps=100, n_classes=n_classes, seed=seed),
        torchattacks.FAB(
            model, norm=n, eps=eps, steps=100, multi_targeted=True, n_classes=n_classes, seed=seed
        ),
        torchattacks.Square(model, norm=n, eps=eps, n_queries=5000, seed=seed),
    ]

    def run(x: torch.Tensor, y: torch.Tensor, log: list | None = None) -> torch.Tensor:
        adv = x.clone()
        with torch.no_grad():
            idx = torch.nonzero(model(x).argmax(1) == y).flatten()
        for atk in chain:
            if len(idx) == 0:
                break
            t = time.perf_counter()
            a = atk(x[idx], y[idx])
            with torch.no_grad():
                still = model(a).argmax(1) == y[idx]
            adv[idx[~still]] = a[~still]
            if log is not None:
                log.append((type(atk).__name__, len(idx), time.perf_counter() - t))
            idx = idx[still]
        return adv

    return run
