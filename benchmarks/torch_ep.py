"""PyTorch copy of the published EP-CNN approach, for side-by-side benchmarks only.

The published code writes Phi in PyTorch and takes dPhi/ds by autograd at every step, all layers
updated at once; the EP parameter update is autograd of the contrast of Phi between the two
nudged phases, then SGD. This is that approach on our weights (HWIO / [in, out] layouts are
converted), on any device, so that ours and it can be checked to compute the same states and
gradients before they are timed. Not part of the library.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from eqrobust.energy import EnergyConfig


class TorchEP:
    """Phi, the free and nudged phases, the symmetric EP gradient and the SGD step in PyTorch.

    Args:
        params: eqrobust EP `Params` (conv w [k, k, C_in, C_out], fc / readout w [F_in, F_out]).
        cfg: the `EnergyConfig` (softmax readout; "my_hard_sig" activation).
        device: torch device.
        dtype: parameter and state dtype.
    """

    def __init__(self, params, cfg: EnergyConfig, device="cpu", dtype=torch.float32):
        if cfg.output != "softmax":
            raise ValueError("TorchEP implements the softmax readout (the robustness papers')")
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.layers = []
        for i, (w, b) in enumerate(params):
            w = torch.from_numpy(np.array(w, np.float32))
            w = w.permute(3, 2, 0, 1) if i < cfg.num_conv else w.T  # HWIO -> OIHW, [in,out] -> T
            b = torch.from_numpy(np.array(b, np.float32))
            self.layers.append((w.contiguous().to(device, dtype), b.to(device, dtype)))
        self.mean = torch.tensor(cfg.mean, device=device, dtype=dtype).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std, device=device, dtype=dtype).view(1, -1, 1, 1)
        self.act = {"my_hard_sig": lambda u: torch.clamp(0.5 * u, 0, 1)}[cfg.activation]
        self.momentum = None

    def parameters(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer]

    def readout(self, s_last: torch.Tensor) -> torch.Tensor:
        w, b = self.layers[-1]
        # The JAX readout flattens NHWC states; NCHW states are permuted first.
        flat = s_last.permute(0, 2, 3, 1).flatten(1) if s_last.dim() == 4 else s_last
        return F.linear(flat, w, b)

    def phi(self, x, states, beta: float = 0.0, y=None) -> torch.Tensor:
        """Sum over the batch of Phi(x, s) - beta * CE(readout(s), y); x NCHW in [0, 1]."""
        s_prev, total = (x - self.mean) / self.std, 0.0
        nc = self.cfg.num_conv
        for i in range(nc):
            w, b = self.layers[i]
            u = F.conv2d(s_prev, w, b, padding=self.cfg.paddings[i])
            total = total + (F.max_pool2d(u, 2) * states[i]).sum()
            s_prev = states[i]
        for j in range(len(self.cfg.fc)):
            w, b = self.layers[nc + j]
            flat = s_prev.permute(0, 2, 3, 1).flatten(1) if s_prev.dim() == 4 else s_prev
            total = total + (F.linear(flat, w, b) * states[nc + j]).sum()
            s_prev = states[nc + j]
        if beta != 0.0:
            total = total - beta * F.cross_entropy(self.readout(s_prev), y, reduction="sum")
        return total

    def zeros(self, batch: int) -> list[torch.Tensor]:
        shapes = [(c, h, w) for (h, w, c) in self.cfg.conv_shapes] + [(f,) for f in self.cfg.fc]
        return [torch.zeros(batch, *s, device=self.device, dtype=self.dtype) for s in shapes]

    def phase(
        self, x, states, steps: int, beta: float = 0.0, y=None, create_graph=False, update="sync"
    ):
        """`steps` updates s <- sigma(dPhi/ds): all layers at once ("sync"), or even/odd sweeps
        ("async": layers 1, 3, ... then 2, 4, ..., one autograd of Phi per half, as the even/odd
        scheme is written in PyTorch); differentiable w.r.t. x when create_graph (BPTT through
        the phase, for attacks)."""
        halves = (
            [range(len(states))] if update == "sync" else [range(p, len(states), 2) for p in (0, 1)]
        )
        with torch.enable_grad():  # torchattacks calls models under no_grad too
            states = [s if s.requires_grad else s.detach().requires_grad_() for s in states]
            for _ in range(steps):
                for layers in halves:
                    grads = torch.autograd.grad(
                        self.phi(x, states, beta, y),
                        [states[i] for i in layers],
                        create_graph=create_graph,
                    )
                    states = list(states)
                    for i, g in zip(layers, grads, strict=True):
                        s = self.act(g)
                        states[i] = s if create_graph else s.detach().requires_grad_()
        return states if create_graph else [s.detach() for s in states]

    def free_phase(self, x, steps: int, update: str = "sync") -> list[torch.Tensor]:
        return self.phase(x, self.zeros(x.shape[0]), steps, update=update)

    def ep_gradient(
        self, x, y, t1: int, t2: int, beta: float, update: str = "sync"
    ) -> list[torch.Tensor]:
        """Symmetric EP estimate -(dPhi/dtheta(s^+b) - dPhi/dtheta(s^-b)) / (2 b), batch mean."""
        s_free = self.free_phase(x, t1, update)  # detached: each phase starts from fresh leaves
        s_pos = self.phase(x, s_free, t2, beta, y, update=update)
        s_neg = self.phase(x, s_free, t2, -beta, y, update=update)
        params = self.parameters()
        for p in params:
            p.requires_grad_(True)
        b = x.shape[0]
        contrast = (self.phi(x, s_neg, -beta, y) - self.phi(x, s_pos, beta, y)) / (2 * beta * b)
        grads = torch.autograd.grad(contrast, params)
        for p in params:
            p.requires_grad_(False)
        return list(grads)

    def train_step(
        self, x, y, t1: int, t2: int, beta: float, lrs, momentum=0.9, wd=3e-4, update="sync"
    ):
        """EP gradient, then layer-wise SGD with momentum and coupled weight decay (PyTorch's
        torch.optim.SGD semantics), in place."""
        grads = self.ep_gradient(x, y, t1, t2, beta, update)
        params = self.parameters()
        if self.momentum is None:
            self.momentum = [torch.zeros_like(p) for p in params]
        with torch.no_grad():
            for i, (p, g, buf) in enumerate(zip(params, grads, self.momentum, strict=True)):
                d = g + wd * p
                buf.mul_(momentum).add_(d)
                p.sub_(lrs[i // 2] * buf)

    def classifier(self, steps: int, update: str = "sync") -> torch.nn.Module:
        """nn.Module: NCHW x -> logits after `steps` free-phase steps, differentiable in x by
        BPTT (for torchattacks)."""
        outer = self

        class _EPModule(torch.nn.Module):
            def forward(self, x):
                s = outer.phase(
                    x, outer.zeros(x.shape[0]), steps, create_graph=x.requires_grad, update=update
                )
                return outer.readout(s[-1])

        return _EPModule()
