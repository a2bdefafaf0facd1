"""Report figures (matplotlib; no backend is chosen here, so notebooks keep inline plots)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from eqrobust.report.text import mean_ci, value_label, wilson
from eqrobust.results import ModelResult, StudyResults


def _errorbar(
    ax: Any,
    x: Sequence[float],
    runs_values: list[list[float]],
    label: str,
    n: Sequence[int] | None = None,
    **kw,
):
    """Mean over seeds with Student-t error bars; one seed with its 95 % Wilson band when the
    number of examples per point `n` is given."""
    arr = np.asarray(runs_values, dtype=np.float64)  # [seeds, points]
    stats_ = [mean_ci(arr[:, i]) for i in range(arr.shape[1])]
    mean = [s[0] for s in stats_]
    err = [s[1] or 0.0 for s in stats_]
    if arr.shape[0] > 1:
        ax.errorbar(x, mean, yerr=err, label=label, capsize=3, marker="o", ms=3, **kw)
        return
    (line,) = ax.plot(x, mean, label=label, marker="o", ms=3, **kw)
    if n is not None:
        lo, hi = zip(*(wilson(a, k) for a, k in zip(mean, n, strict=True)), strict=True)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)


def _accuracy_axis(ax: Any) -> None:
    """An accuracy y-axis in [0, 1] with a light grid (every accuracy plot)."""
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: str) -> None:
    """Lay out, write the PNG, and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _panels(k: int) -> tuple[Any, np.ndarray]:
    cols = min(k, 3)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[k:]:
        ax.axis("off")
    return fig, axes.flat


def _strength_axis(ax: Any, param: str, norm: str) -> bool:
    """x label in the units people use; True when Linf radii are plotted in 1/255."""
    linf = param == "eps" and norm == "linf"
    if param == "c":
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("C&W constant c (not a budget)")
    else:
        ax.set_xlabel("ε (× 1/255)" if linf else "ε (L2)")
    return linf


def attacks(results: StudyResults, path: str) -> None:
    """Accuracy vs attack strength: one panel per attack, then the worst case over attacks per
    norm; every model a line, one seed with its 95 % Wilson band, several with error bars."""
    groups = results.by_name()
    models = sorted(results.models, key=lambda m: -len(m.attacks))  # evaluation order
    names = list(dict.fromkeys(a for m in models for a in m.attacks))
    norms = [n for n in ("linf", "l2") if any(w.norm == n for m in models for w in m.worst_case)]
    fig, axes = _panels(max(len(names) + len(norms), 1))
    for ax, aname in zip(axes, names, strict=False):
        spec = next(m.attacks[aname] for m in results.models if aname in m.attacks)
        linf = _strength_axis(ax, spec.param, spec.norm)
        ns = set()
        for mname, runs in groups.items():
            runs = [m for m in runs if aname in m.attacks]
            if not runs:
                continue
            a = runs[0].attacks[aname]
            ns.add(a.n)
            xs = [0.0, *a.values]
            ys = [[m.clean.accuracy, *m.attacks[aname].accuracy] for m in runs]
            nn = [runs[0].clean.n] + [a.n] * len(a.values)
            _errorbar(ax, [v * 255 for v in xs] if linf else xs, ys, mname, nn)
        ax.set_title(f"{spec.label} (n={'/'.join(str(k) for k in sorted(ns))})", fontsize=9)
        _accuracy_axis(ax)
    for ax, norm in zip(axes[len(names) :], norms, strict=False):
        linf = _strength_axis(ax, "eps", norm)
        for mname, runs in groups.items():
            ws = [
                sorted((w for w in m.worst_case if w.norm == norm), key=lambda w: w.value)
                for m in runs
            ]
            if not ws or not ws[0]:
                continue
            xs = [0.0, *(w.value for w in ws[0])]
            ys = [
                [m.clean.accuracy, *(w.accuracy for w in wl)]
                for m, wl in zip(runs, ws, strict=True)
            ]
            nn = [runs[0].clean.n] + [w.n for w in ws[0]]
            _errorbar(ax, [v * 255 for v in xs] if linf else xs, ys, mname, nn)
        ax.set_title(f"worst case over {'L∞' if norm == 'linf' else 'L2'} attacks", fontsize=9)
        _accuracy_axis(ax)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def corruptions(results: StudyResults, path: str) -> None:
    """Mean corruption accuracy vs severity (severity 0 = clean), every model a line."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for mname, runs in results.by_name().items():
        runs = [m for m in runs if m.corruptions]
        if not runs:
            continue
        xs = [0, *runs[0].corruptions.severities]
        ys = [[m.clean.accuracy, *m.corruptions.per_severity] for m in runs]
        nn = [runs[0].clean.n] + [runs[0].corruptions.n] * len(runs[0].corruptions.severities)
        _errorbar(ax, xs, ys, mname, nn)
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("accuracy (mean over corruptions)")
    _accuracy_axis(ax)
    ax.legend(fontsize=7)
    _save(fig, path)


def trajectory(results: StudyResults, path: str) -> None:
    """Clean accuracy of the readout at every step of the dynamics (EP paper Fig. 4a)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for mname, runs in results.by_name().items():
        runs = [m for m in runs if m.dynamics and m.dynamics.trajectory]
        if not runs:
            continue
        steps = runs[0].dynamics.trajectory.steps
        _errorbar(ax, steps, [m.dynamics.trajectory.accuracy for m in runs], mname)
    ax.set_xlabel("step t of the dynamics (EP: free phase)")
    ax.set_ylabel("clean accuracy")
    _accuracy_axis(ax)
    ax.legend(fontsize=7)
    _save(fig, path)


def attack_depth(results: StudyResults, path: str) -> None:
    """Robust accuracy vs depth of the attack gradient (unrolled t); other paths as dashed lines."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k = 0
    for mname, runs in results.by_name().items():
        runs = [m for m in runs if m.dynamics and m.dynamics.attack_depth]
        if not runs:
            continue
        ad = runs[0].dynamics.attack_depth
        spec = runs[0].attacks.get(ad.attack)
        label0 = spec.label if spec else ad.attack
        param = spec.param if spec else "eps"
        acc = lambda m, i, j: m.dynamics.attack_depth.variants[i].accuracy[j]
        unrolled = sorted(
            (row.gradient_depth, i)
            for i, row in enumerate(ad.variants)
            if row.mode.startswith("unrolled")
        )
        for j, v in enumerate(ad.values):
            color = colors[k % len(colors)]
            k += 1
            label = f"{mname} {label0} {value_label(param, v)}"
            if unrolled:
                xs = [d for d, _ in unrolled]
                ys = [[acc(m, i, j) for _, i in unrolled] for m in runs]
                _errorbar(ax, xs, ys, label + " (unrolled)", color=color)
            for i, row in enumerate(ad.variants):
                if not row.mode.startswith("unrolled"):
                    mean = mean_ci([acc(m, i, j) for m in runs])[0]
                    ax.axhline(mean, color=color, ls="--", lw=1, label=f"{label} ({row.mode})")
        depth = runs[0].dynamics.prediction_depth
        if depth:
            ax.axvline(depth, color="gray", ls=":", lw=1)
    ax.set_xlabel("attack-gradient depth t (prediction always at T, dotted)")
    ax.set_ylabel("robust accuracy")
    _accuracy_axis(ax)
    ax.legend(fontsize=6)
    _save(fig, path)


def _show(ax: Any, img: np.ndarray, title: str) -> None:
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(img, 0, 1))
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def gallery(model: ModelResult, path: str, class_names: Sequence[str] | None = None) -> None:
    """Clean / adversarial / amplified difference for the gallery images of one model."""
    g = model.gallery
    clean, adv = np.asarray(g.clean), np.asarray(g.adversarial)
    n = len(clean)
    diff = adv - clean
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n, 4.8), squeeze=False)
    name = lambda k: class_names[k] if class_names else str(k)
    for i in range(n):
        d = diff[i]
        scale = float(np.abs(d).max())
        amp = 0.5 / scale if scale > 0 else 1.0
        _show(axes[0, i], clean[i], f"clean: {name(g.pred_clean[i])}\n(label {name(g.labels[i])})")
        _show(
            axes[1, i], adv[i], f"adv: {name(g.pred_adversarial[i])}\n‖δ‖₂={np.linalg.norm(d):.2f}"
        )
        _show(axes[2, i], 0.5 + amp * d, f"δ × {amp:.1f}")
    spec = model.attacks.get(g.attack)
    label, param = (spec.label, spec.param) if spec else (g.attack, "eps")
    fig.suptitle(f"{model.name}: {label} {value_label(param, g.eps)}", fontsize=9)
    _save(fig, path)


# key -> (figure function, file name, whether the results have data for it)
def spectrum(results: StudyResults, path: str) -> None:
    """Histogram of the leading-eigenvalue modulus at s*(x) and s*(x_adv) (study meta)."""
    sp = results.meta["spectrum"]
    clean, adv = np.asarray(sp["radius_clean"]), np.asarray(sp["radius_adversarial"])
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    bins = np.linspace(min(clean.min(), adv.min()), max(clean.max(), adv.max(), 1.0), 25)
    ax.hist(clean, bins=bins, alpha=0.6, label=f"clean (n={len(clean)})")
    ax.hist(adv, bins=bins, alpha=0.6, label="PGD-Linf x_adv")
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("|lambda_max| of the free-phase Jacobian at s*")
    ax.set_ylabel("examples")
    ax.set_title(sp["model"], fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


FIGURES: dict[str, tuple[Any, str, Any]] = {
    "attacks": (attacks, "accuracy_vs_eps.png", lambda r: any(m.attacks for m in r.models)),
    "corruptions": (corruptions, "corruptions.png", lambda r: any(m.corruptions for m in r.models)),
    "trajectory": (
        trajectory,
        "dynamics_accuracy.png",
        lambda r: any(m.dynamics and m.dynamics.trajectory for m in r.models),
    ),
    "attack_depth": (
        attack_depth,
        "attack_depth.png",
        lambda r: any(m.dynamics and m.dynamics.attack_depth for m in r.models),
    ),
    "spectrum": (spectrum, "spectrum.png", lambda r: bool(r.meta.get("spectrum"))),
}
