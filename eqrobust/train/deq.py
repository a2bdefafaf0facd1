"""DEQ training: unrolled pretraining, clean / PGD-AT / TRADES, random intermediate states, Jacobian
regularisation, validation-split model selection; through the one training loop (`fit`)."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from eqrobust import compile_options
from eqrobust import data as data_lib
from eqrobust.attacks import pgd
from eqrobust.models import build_model
from eqrobust.models.deq import DEQNet, deq_classifier, deq_compiler_options
from eqrobust.train import Trained
from eqrobust.train.loop import accuracy, fit
from eqrobust.train.supervised import cross_entropy, load_data

OBJECTIVES = ("clean", "pgd_at", "trades")


def split_validation(ds: data_lib.Dataset, num_val: int) -> tuple[data_lib.Dataset, tuple]:
    """Hold out the last `num_val` training examples: (train dataset, (x_val, y_val))."""
    n = len(ds.x_train)
    if not 0 < num_val < n:
        raise ValueError(f"num_val={num_val} must be in 1..{n - 1} (training set size {n})")
    val = (ds.x_train[n - num_val :], ds.y_train[n - num_val :])
    return ds._replace(x_train=ds.x_train[: n - num_val], y_train=ds.y_train[: n - num_val]), val


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
    """Adam (weight decay 0 unless set) with cosine decay per step from lr to lr_min."""
    o = config.optimizer
    lr, lr_min = float(o.lr), float(o.get("lr_min", 0.0))
    schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1), alpha=lr_min / lr)
    tx = optax.adam(schedule)
    wd = float(o.get("weight_decay", 0.0) or 0.0)
    if wd:
        tx = optax.chain(optax.add_decayed_weights(wd), tx)
    return tx, schedule


def trades_attack(logits_fn, x, *, key, eps, steps, step_size):
    """TRADES inner maximisation: Linf sign ascent on KL(p(x) || p(x')) from x + 0.001 N(0, 1).

    Args:
        logits_fn: x -> logits [B, K].
        x: [B, H, W, C] in [0, 1].

    Returns:
        x_adv [B, H, W, C] (no gradient).
    """
    p_nat = jax.nn.softmax(jax.lax.stop_gradient(logits_fn(x)), -1)

    def kl(xa):
        logq = jax.nn.log_softmax(logits_fn(xa), -1)
        return jnp.sum(p_nat * (jnp.log(p_nat + 1e-12) - logq))

    def body(_, xa):
        g = jax.grad(kl)(xa)
        xa = xa + step_size * jnp.sign(g)
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)

    x0 = jnp.clip(x + 0.001 * jax.random.normal(key, x.shape, x.dtype), 0.0, 1.0)
    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, x0))


def trades_kl(logits_nat: jax.Array, logits_adv: jax.Array) -> jax.Array:
    """KL(p_nat || p_adv) summed over the batch, divided by the batch size (TRADES)."""
    p = jax.nn.softmax(logits_nat, -1)
    return jnp.sum(p * (jax.nn.log_softmax(logits_nat, -1) - jax.nn.log_softmax(logits_adv, -1)))


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(n_train // batch_size, 1)


class _Steps:
    """The jitted pieces of a DEQ run: forward, training adversary, pretraining / main step."""

    def __init__(
        self, config: ml_collections.ConfigDict, model: DEQNet, graphdef, tx, schedule, spe
    ):
        self.graphdef = graphdef
        self.tx, self.schedule = tx, schedule
        self.objective = config.get("objective", "clean")
        self.n_iter = model.solver.f_max_iter
        self.pretrain_steps = int(config.get("pretrain_steps", 0) or 0)
        self.rand_inter = bool(config.get("random_intermediate", False))
        jac = config.jac
        self.jac_weight, self.jac_freq = float(jac.weight), float(jac.freq)
        self.jac_stop_step = int(jac.stop_epoch) * spe
        self.jac_probes, self.jac_delta = int(jac.probes), int(jac.get("rand_f_thres_delta", 2))
        self.adv = config.adv
        self.trades_beta = float(config.trades_beta)

    def forward(self, params, rest, x, *, train: bool, key=None, **kw):
        """(DEQOutput, the updated non-parameter state) of the model in train or eval mode."""
        m = nnx.merge(self.graphdef, params, rest, copy=True)
        m.train() if train else m.eval()
        out = m.equilibrium(x, key=key, **kw)
        return out, nnx.state(m, nnx.Not(nnx.Param))

    def eval_logits(self, state: dict, x: jax.Array) -> jax.Array:
        return self.forward(state["params"], state["rest"], x, train=False)[0].logits

    def craft(self, state: dict, x, y, key, k):
        """Training adversary in eval mode (dropout off), with the step's k if random-inter."""
        logits_fn = jax.tree_util.Partial(
            lambda p, r, kk, xx: self.forward(p, r, xx, train=False, k=kk)[0].logits,
            state["params"],
            state["rest"],
            k,
        )
        eps, step_size, steps = float(self.adv.eps), float(self.adv.step_size), int(self.adv.steps)
        if self.objective == "pgd_at":
            res = pgd(
                logits_fn,
                x,
                y,
                key=key,
                eps=eps,
                norm="linf",
                steps=steps,
                step_size=step_size,
                random_start=True,
            )
            return jax.lax.stop_gradient(res.x_adv)
        return trades_attack(logits_fn, x, key=key, eps=eps, steps=steps, step_size=step_size)

    def _finish(self, state, grads, rest, loss, logits, y, stats, jac_val, pre):
        updates, opt = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        count = state["step"]
        m = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "residual": stats[0],
            "solver_steps": stats[1],
            "jac_loss": jac_val,
            "pretrain": jnp.asarray(pre, jnp.float32),
            "lr": self.schedule(count),
        }
        return {"params": params, "rest": rest, "opt": opt, "step": count + 1}, m

    @staticmethod
    def _stats(out):
        return jnp.mean(out.residual), jnp.mean(out.steps.astype(jnp.float32))

    def pretrain_step(self, state, x, y, key):
        """The weight-tied unrolled net on clean data (BPTT)."""

        def loss_fn(params):
            out, rest = self.forward(
                params, state["rest"], x, train=True, key=key, pretrain=True, final_residual=True
            )
            return cross_entropy(out.logits, y), (out, rest)

        (loss, (out, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        return self._finish(
            state, grads, rest, loss, out.logits, y, self._stats(out), jnp.zeros(()), 1.0
        )

    def _jac_kwargs(self, k, k_jit, k_probe) -> dict:
        """Solver arguments of a Jacobian-loss step, with the reference's iteration jitter."""
        n, d = self.n_iter, self.jac_delta
        jit = jax.random.randint(k_jit, (), -d, d) if d else 0
        hi = n + max(d - 1, 0)
        return {
            "k": jnp.clip((k if k is not None else n) + jit, 1, hi),
            "k_min": 1 if self.rand_inter else max(n - d, 1),
            "max_iter": hi,
            "jac_probes": self.jac_probes,
            "jac_key": k_probe,
        }

    def main_step(self, state, x, y, key):
        """Clean / PGD-AT / TRADES step on the DEQ, Jacobian loss with probability jac.freq."""
        k_k, k_adv, k_d1, k_d2, k_flag, k_jit, k_probe = jax.random.split(key, 7)
        k = jax.random.randint(k_k, (), 1, self.n_iter + 1) if self.rand_inter else None
        x_in = x if self.objective == "clean" else self.craft(state, x, y, k_adv, k)

        def loss_fn(params, with_jac: bool):
            kw = self._jac_kwargs(k, k_jit, k_probe) if with_jac else {"k": k}
            out, rest = self.forward(params, state["rest"], x_in, train=True, key=k_d1, **kw)
            if self.objective == "trades":
                nat, rest = self.forward(params, rest, x, train=True, key=k_d2, k=k)
                kl = trades_kl(nat.logits, out.logits) / x.shape[0]
                loss = cross_entropy(nat.logits, y) + self.trades_beta * kl
                logits = nat.logits
            else:
                loss = cross_entropy(out.logits, y)
                logits = out.logits
            jv = out.jac_loss if with_jac else jnp.zeros(())
            return loss + self.jac_weight * jv, (loss, logits, self._stats(out), rest, jv)

        def grads_of(with_jac):
            def g(params):
                f = jax.value_and_grad(lambda p: loss_fn(p, with_jac), has_aux=True)
                (_, aux), grads = f(params)
                return aux, grads

            return g

        if self.jac_weight > 0 and self.jac_freq > 0:
            on = jax.random.bernoulli(k_flag, self.jac_freq) & (state["step"] < self.jac_stop_step)
            aux, grads = jax.lax.cond(on, grads_of(True), grads_of(False), state["params"])
        else:
            aux, grads = grads_of(False)(state["params"])
        loss, logits, stats, rest, jv = aux
        return self._finish(state, grads, rest, loss, logits, y, stats, jv, 0.0)

    def train_step(self, state, x, y, key):
        if self.pretrain_steps <= 0:
            return self.main_step(state, x, y, key)
        return jax.lax.cond(
            state["step"] < self.pretrain_steps,
            self.pretrain_step,
            self.main_step,
            state,
            x,
            y,
            key,
        )


def make_validator(steps: _Steps, config: ml_collections.ConfigDict, x_val, y_val):
    """state -> validation row: clean accuracy, residuals, solver steps, PGD-10 accuracy."""
    val = config.val
    n_pgd = min(int(val.pgd_examples), len(x_val))
    val_bs = int(config.get("eval_batch_size", 500))
    forward = steps.forward

    @compile_options.jit
    def val_clean(state, x):
        out, _ = forward(state["params"], state["rest"], x, train=False, final_residual=True)
        return out.logits, out.residual, out.steps, out.final_residual

    def _val_logits(p, r, xx):  # one function object: the PGD core compiles once per run
        return forward(p, r, xx, train=False)[0].logits

    def validate(state) -> dict:
        t0 = time.time()
        correct, res, fres, nsteps = 0, [], [], []
        for i in range(0, len(x_val), val_bs):
            xb = data_lib.to_float(x_val[i : i + val_bs])
            logits, r, s, fr = val_clean(state, xb)
            correct += int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(y_val[i : i + val_bs])))
            res.append(np.asarray(r))
            fres.append(np.asarray(fr))
            nsteps.append(np.asarray(s))
        row = {
            "val_clean_accuracy": correct / len(x_val),
            "val_residual": float(np.mean(np.concatenate(res))),
            "val_final_residual": float(np.mean(np.concatenate(fres))),
            "val_solver_steps": float(np.mean(np.concatenate(nsteps))),
        }
        if n_pgd:
            clf_fn = jax.tree_util.Partial(_val_logits, state["params"], state["rest"])
            ok = 0
            for i in range(0, n_pgd, val_bs):
                xb = data_lib.to_float(x_val[i : min(i + val_bs, n_pgd)])
                yb = jnp.asarray(y_val[i : min(i + val_bs, n_pgd)])
                r = pgd(
                    clf_fn,
                    xb,
                    yb,
                    key=jax.random.PRNGKey(i),
                    eps=float(val.eps),
                    norm="linf",
                    steps=int(val.pgd_steps),
                    step_size=float(val.step_size),
                    random_start=True,
                )
                ok += int(jnp.sum(~r.success & (jnp.argmax(clf_fn(xb), -1) == yb)))
            row["val_pgd_accuracy"] = ok / n_pgd
        row["val_time_s"] = round(time.time() - t0, 2)
        return row

    return validate


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    *,
    stop_at_step: int | None = None,
) -> Trained:
    """Trains (or resumes, or loads) the DEQ of `config`; selects the best epoch on validation.

    Its programs compile with the DEQ's compiler options (`models.deq.deq_compiler_options`),
    as the evaluation's do.

    Args:
        config: see eqrobust/configs/deq.py (objective, random_intermediate, jac, adv, val, ...).
        workdir: checkpoints, metrics.jsonl (fit's rows plus one "val" row per epoch), best/
            (the selected parameters) and selected.json go here; None saves nothing.
        stop_at_step: stop early at this step as if interrupted.

    Returns:
        Trained whose classifier is the selected (best validation) model in eval mode, with its
        gradient path declared; history holds fit's rows, the validation rows and a final row
        with the selected model's test accuracy.
    """
    with compile_options.options(deq_compiler_options()):
        return _train(config, workdir, stop_at_step)


def _train(
    config: ml_collections.ConfigDict, workdir: str | Path | None, stop_at_step: int | None
) -> Trained:
    objective = config.get("objective", "clean")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    full = load_data(config)
    ds, (x_val, y_val) = split_validation(full, int(config.num_val))
    model = build_model(config, ds)
    if not isinstance(model, DEQNet):
        raise ValueError("the deq trainer needs config.model.name = 'deq'")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    spe = _steps_per_epoch(len(ds.x_train), int(config.batch_size))
    num_steps = config.get("num_steps", 0) or 0
    total = int(num_steps) if num_steps else int(config.num_epochs) * spe
    tx, schedule = make_optimizer(config, total)
    init_state = {
        "params": params,
        "rest": rest,
        "opt": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
    }
    steps = _Steps(config, model, graphdef, tx, schedule, spe)
    validate = make_validator(steps, config, x_val, y_val)
    n_pgd = min(int(config.val.pgd_examples), len(x_val))
    select_key = "val_clean_accuracy" if objective == "clean" or not n_pgd else "val_pgd_accuracy"

    wd = Path(workdir) if workdir is not None else None
    fit_cfg = ml_collections.ConfigDict(config.to_dict())
    fit_cfg.data_dir = config.get("data_dir", None)
    # No test accuracy inside fit: it is measured once below, on the selected model (each
    # full-test pass costs ~26 s at cpu scale).
    fit_cfg.eval_every_epochs = 0
    fit_cfg.num_steps = total
    best_path = wd / "best.json" if wd is not None else None
    if wd is not None and config.get("force_retrain", False):  # fit discards the run itself
        best_path.unlink(missing_ok=True)
        (wd / "selected.json").unlink(missing_ok=True)
    best = (
        json.loads(best_path.read_text()) if best_path is not None and best_path.exists() else None
    )
    selected: dict = {}  # the best state when nothing is saved (workdir None)
    ckptr = ocp.StandardCheckpointer() if wd is not None else None

    trained_here = []  # set when an epoch ends in this call (the run was not just loaded)

    def validate_and_select(step: int, state: dict) -> dict:
        nonlocal best
        trained_here.append(step)
        if best is None and step >= total:
            # The run's only epoch end (e.g. a cpu-scale run shorter than one epoch): there is
            # nothing to select between, so the validation pass (PGD included) is skipped.
            logging.info(
                "validation skipped at step %d: the final state is the only candidate", step
            )
            return {"validation": "skipped: the final state is the only candidate"}
        row = validate(state)
        logging.info("validation at step %d: %s", step, row)
        print(json.dumps({"step": step, **row}), flush=True)
        if best is None or row[select_key] > best[select_key]:
            best = {"step": step, "epoch": step / spe, select_key: row[select_key]}
            sel = {"params": state["params"], "rest": state["rest"]}
            if wd is not None:
                ckptr.save((wd / "best").absolute(), sel, force=True)
                ckptr.wait_until_finished()
                best_path.write_text(json.dumps(best))
            else:
                selected["state"] = jax.device_get(sel)
        return row

    # One fit call: the training step compiles once for the whole run.
    result = fit(
        config=fit_cfg,
        workdir=wd,
        data=ds,
        init_state=init_state,
        train_step=steps.train_step,
        eval_logits=steps.eval_logits,
        stop_at_step=stop_at_step,
        on_epoch_end=validate_and_select,
    )
    state, history, step = result.state, result.history, result.step
    sel = selected.get("state") or {"params": state["params"], "rest": state["rest"]}
    if "state" not in selected and wd is not None and (wd / "best").exists():
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, sel)
        sel = ckptr.restore((wd / "best").absolute(), abstract)
    nnx.update(model, sel["params"], sel["rest"])
    model.eval()
    clf = deq_classifier(model, name=config.get("name", "DEQ"))
    final = {
        "step": step,
        "selected_step": best["step"] if best else step,
        "selected_by": select_key if best else "final state (only candidate)",
    }
    stored = None if trained_here else _stored_selection(wd)
    if stored is not None and all(stored.get(k) == v for k, v in final.items()):
        # A finished run loaded again: the selected weights' test accuracy is already measured.
        test_acc = float(stored["test_accuracy"])
    else:
        test_acc = float(
            _accuracy(
                clf.logits_fn, full.x_test, full.y_test, batch_size=int(config.eval_batch_size)
            )
        )
    final["test_accuracy"] = test_acc
    history = history + [final]
    if wd is not None:
        (wd / "selected.json").write_text(json.dumps(final))
    return Trained(clf, state, history, config, module=model)


def _stored_selection(wd: Path | None) -> dict | None:
    """selected.json of a finished run (None when absent or unreadable)."""
    path = wd / "selected.json" if wd is not None else None
    if path is None or not path.exists():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and "test_accuracy" in stored else None


@compile_options.jit
def _apply(logits_fn: jax.tree_util.Partial, x: jax.Array) -> jax.Array:
    return logits_fn(x)


def _accuracy(logits_fn, x: np.ndarray, y: np.ndarray, *, batch_size: int) -> float:
    # The Partial's weights are jit arguments: closed over, XLA constant-folds the convolutions
    # of the weights (seconds per op at batch 500).
    f = functools.partial(_apply, logits_fn)
    return accuracy(f, x, y, batch_size=batch_size) if len(x) else math.nan
