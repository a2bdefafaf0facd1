"""cpu DEQ throughput (train step, forward): eqrobust (JAX) vs the same model in torch + torchdeq.

Both sides run the same model with the same weights: stem -> Broyden (8 steps, relative stop 1e-3,
lowest residual per example, from z0 = 0) -> z = f(z*) -> 5 damped steps 0.5/0.5 -> head. On the
PyTorch side the solver and the gradient are torchdeq's (`get_deq(f_solver="broyden", grad=1,
tau=1.0)` gives f(z*) with the phantom gradient of that application; the 5 damped steps follow
in plain PyTorch, as in the DEQ robustness references). Training step = forward + backward +
Adam on a clean batch (phantom gradient, eval-free BatchNorm in train mode, dropout 0).

    python -m benchmarks.deq [--batch 96] [--repeats 5] [--workdir runs/deq_cpu]

Runs alternate (JAX, torch 1 thread, torch 2 threads, ...); medians and min-max spread are printed
with os.getloadavg() beside each figure (other processes may share the CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from eqrobust.configs.deq import get_config
from eqrobust.data import synthetic
from eqrobust.models import build_model


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


# ----------------------------------------------------------------------------- PyTorch twin


def torch_model(state: dict, model):
    """The same DEQ in PyTorch (NCHW), parameters copied from the NNX pure-dict `state`."""
    import torch
    import torch.nn.functional as F
    from torchdeq import get_deq

    def t(a):
        return torch.nn.Parameter(torch.tensor(np.asarray(a)))

    def conv_params(d):  # HWIO -> OIHW
        p = {"v": t(np.transpose(np.asarray(d["v"]), (3, 2, 0, 1)))}
        if "g" in d:
            p["g"] = t(d["g"])
        return p

    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.params = torch.nn.ParameterDict()
            self.buffers_ = {}
            flat = {}

            def walk(prefix, d):
                for k, v in d.items():
                    key = f"{prefix}_{k}" if prefix else str(k)
                    if isinstance(v, dict) and "v" in v:
                        for kk, pp in conv_params(v).items():
                            flat[f"{key}_{kk}"] = pp
                        if "bias" in v:
                            flat[f"{key}_bias"] = t(v["bias"])
                    elif isinstance(v, dict) and "mean" in v:  # BatchNorm
                        flat[f"{key}_scale"] = t(v["scale"])
                        flat[f"{key}_bias"] = t(v["bias"])
                        self.buffers_[f"{key}_mean"] = torch.tensor(np.asarray(v["mean"]))
                        self.buffers_[f"{key}_var"] = torch.tensor(np.asarray(v["var"]))
                    elif isinstance(v, dict) and "kernel" in v:  # Linear
                        flat[f"{key}_kernel"] = t(v["kernel"])
                        flat[f"{key}_bias"] = t(v["bias"])
                    elif isinstance(v, dict) and set(v) <= {"scale", "bias"}:  # GroupNorm
                        for kk, pp in v.items():
                            flat[f"{key}_{kk}"] = t(pp)
                    elif isinstance(v, dict):
                        walk(key, v)

            walk("", state)
            for k, v in flat.items():
                self.params[k] = v
            self.model = model
            self.deq = get_deq(
                f_solver="broyden",
                f_max_iter=model.solver.f_max_iter,
                f_tol=model.solver.f_tol,
                f_stop_mode="rel",
                grad=1,
                tau=1.0,
            )

        # -- pieces
        def conv(self, key, x, stride=1):
            p = self.params
            v = p[f"{key}_v"]
            w = v
            if f"{key}_g" in p:
                w = (
                    p[f"{key}_g"].view(-1, 1, 1, 1)
                    * v
                    / v.pow(2).sum((1, 2, 3), keepdim=True).sqrt()
                )
            k = w.shape[-1]
            return F.conv2d(x, w, stride=stride, padding=k // 2)

        def gn(self, key, x, groups):
            p = self.params
            w, b = p.get(f"{key}_scale"), p.get(f"{key}_bias")
            if f"{key}_scale" not in p:
                w = b = None
            return F.group_norm(x, groups, w, b, eps=1e-5)

        def bn(self, key, x):
            p = self.params
            return F.batch_norm(
                x,
                self.buffers_[f"{key}_mean"],
                self.buffers_[f"{key}_var"],
                p[f"{key}_scale"],
                p[f"{key}_bias"],
                training=self.training,
                momentum=0.1,
                eps=1e-5,
            )

        def cell(self, z, inj):
            m = self.model.cell
            nb, groups = m.nb, m.blocks[0].gn1.groups
            ys = []
            for i in range(nb):
                b = f"cell_blocks_{i}"
                out = F.relu(self.gn(f"{b}_gn1", self.conv(f"{b}_conv1", z[i]), groups))
                out = self.conv(f"{b}_conv2", out)
                if i == 0:
                    out = out + inj
                out = self.gn(f"{b}_gn2", out, groups) + z[i]
                ys.append(F.relu(self.gn(f"{b}_gn3", out, groups)))
            outs, idx = [], 0
            for i in range(nb):
                s = ys[i]
                for j in range(nb):
                    if j == i:
                        continue
                    f = f"cell_fuse_{idx}"
                    idx += 1
                    if j > i:
                        u = self.gn(f"{f}_1", self.conv(f"{f}_0", ys[j]), groups)
                        r = 2 ** (j - i)
                        u = u.repeat_interleave(r, 2).repeat_interleave(r, 3)
                        s = s + u[:, :, : s.shape[2], : s.shape[3]]
                    else:
                        d, n = ys[j], i - j
                        for tt in range(n):
                            d = self.gn(
                                f"{f}_{2 * tt + 1}", self.conv(f"{f}_{2 * tt}", d, 2), groups
                            )
                            if tt < n - 1:
                                d = F.relu(d)
                        s = s + d
                post = self.conv(f"cell_post_conv_{i}", F.relu(s))
                outs.append(self.gn(f"cell_post_gn_{i}", post, max(groups // 2, 1)))
            return outs

        def head(self, z):
            def bottleneck(k, x):
                out = F.relu(self.bn(f"{k}_b1", self.conv(f"{k}_c1", x)))
                out = F.relu(self.bn(f"{k}_b2", self.conv(f"{k}_c2", out)))
                out = self.bn(f"{k}_b3", self.conv(f"{k}_c3", out))
                return F.relu(out + self.bn(f"{k}_bd", self.conv(f"{k}_cd", x)))

            y = bottleneck("head_incre_0", z[0])
            for i in range(len(z) - 1):
                d = F.relu(self.bn(f"head_down_{i}_1", self.conv(f"head_down_{i}_0", y, 2)))
                y = bottleneck(f"head_incre_{i + 1}", z[i + 1]) + d
            y = F.relu(self.bn("head_final_bn", self.conv("head_final_conv", y)))
            y = y.mean((2, 3))
            return y @ self.params["head_fc_kernel"] + self.params["head_fc_bias"]

        def forward(self, x):
            h = x
            for s_i, s in enumerate(self.model_stem_strides):
                h = F.relu(self.bn(f"stem_{2 * s_i + 1}", self.conv(f"stem_{2 * s_i}", h, s)))
            inj = h
            shapes = [(c, hh, ww) for hh, ww, c in self.model.state_shapes]
            sizes = [int(np.prod(s)) for s in shapes]
            b = x.shape[0]

            def unflat(zf):
                return [p.view(b, *s) for p, s in zip(zf.split(sizes, 1), shapes)]

            def func(zf):
                return torch.cat([a.reshape(b, -1) for a in self.cell(unflat(zf), inj)], 1)

            z0 = torch.zeros(b, sum(sizes))
            z_out, _ = self.deq(func, z0)
            z = z_out[-1]  # f(z*), phantom gradient of that application
            for _ in range(self.model.solver.grad):
                z = (1 - self.model.solver.tau) * z + self.model.solver.tau * func(z)
            return self.head(unflat(z))

    twin = Twin()
    twin.model_stem_strides = [m.stride for m in model.stem[0::2]]
    return twin


# ----------------------------------------------------------------------------- timing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument(
        "--workdir",
        default=None,
        help="a `deq.py:cpu` training workdir: use its selected weights (best/), where the "
        "solver converges (at random init it does not, and the two Broyden implementations "
        "then return different iterates)",
    )
    args = ap.parse_args()
    import torch

    cfg = get_config("cpu")
    data = synthetic(num_train=args.batch, num_test=8, shape=(28, 28, 1), num_classes=10, seed=0)
    if args.workdir:  # real images for the trained weights
        from eqrobust.data import load

        fm = load("fashion_mnist")
        data = data._replace(x_train=fm.x_test[: args.batch], y_train=fm.y_test[: args.batch])
    model = build_model(cfg, data)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if args.workdir:
        import orbax.checkpoint as ocp

        sel = {"params": params, "rest": rest}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, sel)
        path = os.path.abspath(os.path.join(args.workdir, "best"))
        sel = ocp.StandardCheckpointer().restore(path, abstract)
        params, rest = sel["params"], sel["rest"]
        nnx.update(model, params, rest)
    x_np = np.asarray(data.x_train[: args.batch], np.float32) / 255.0
    y_np = np.asarray(data.y_train[: args.batch])
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    def logits(params, rest, x, train):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.train() if train else m.eval()
        return m(x, key=jax.random.PRNGKey(0)), nnx.state(m, nnx.Not(nnx.Param))

    fwd = jax.jit(lambda p, r, x: logits(p, r, x, False)[0])

    @jax.jit
    def step(params, rest, opt, x, y):
        def loss(p):
            lg, r = logits(p, rest, x, True)
            return optax.softmax_cross_entropy_with_integer_labels(lg, y).mean(), r

        (lv, r), g = jax.value_and_grad(loss, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), r, opt, lv

    state = nnx.to_pure_dict(nnx.state(model))
    twin = torch_model(jax.tree.map(np.asarray, state), model)
    xt, yt = torch.tensor(x_np).permute(0, 3, 1, 2).contiguous(), torch.tensor(y_np).long()
    twin.eval()
    with torch.no_grad():
        lt = twin(xt).numpy()
    lj = np.asarray(fwd(params, rest, x))
    print(
        f"logits agree: max |jax - torch| = {np.abs(lj - lt).max():.2e} (max |logit| "
        f"{np.abs(lj).max():.2f}); argmax agreement {np.mean(lj.argmax(1) == lt.argmax(1)):.3f}"
    )
    topt = torch.optim.Adam(twin.params.values(), lr=1e-3)

    def jax_fwd():
        fwd(params, rest, x).block_until_ready()

    carry = {"p": params, "r": rest, "o": opt}

    def jax_step():
        p, r, o, lv = step(carry["p"], carry["r"], carry["o"], x, y)
        lv.block_until_ready()
        carry.update(p=p, r=r, o=o)

    def torch_fwd():
        twin.eval()
        with torch.no_grad():
            twin(xt)

    def torch_step():
        twin.train()
        topt.zero_grad()
        loss = torch.nn.functional.cross_entropy(twin(xt), yt)
        loss.backward()
        topt.step()

    jax_fwd(), jax_step()  # compile
    runs = {}
    variants = [("jax", None, jax_fwd, jax_step)] + [
        (f"torch({n}t)", n, torch_fwd, torch_step) for n in (1, 2)
    ]
    for _ in range(args.repeats):
        for name, threads, f_fwd, f_step in variants:
            if threads:
                torch.set_num_threads(threads)
            for kind, fn in (("forward", f_fwd), ("train_step", f_step)):
                fn()  # warm
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                dt = (time.perf_counter() - t0) / args.iters
                runs.setdefault((kind, name), []).append((args.batch / dt, _load()))
    print(f"batch {args.batch}, {args.repeats} alternating repeats x {args.iters} iterations")
    for kind in ("forward", "train_step"):
        best_torch = 0.0
        for name, *_ in variants:
            vals = [v for v, _ in runs[(kind, name)]]
            med = statistics.median(vals)
            loads = ", ".join(ld for _, ld in runs[(kind, name)])
            print(
                f"{kind:10s} {name:10s} median {med:8.1f} img/s  [min {min(vals):.1f}, "
                f"max {max(vals):.1f}]  loadavg per run: {loads}"
            )
            if name != "jax":
                best_torch = max(best_torch, med)
        jmed = statistics.median(v for v, _ in runs[(kind, "jax")])
        print(f"{kind:10s} ratio jax / best torch = {jmed / best_torch:.2f}x")


if __name__ == "__main__":
    main()
