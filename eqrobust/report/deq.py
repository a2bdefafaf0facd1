"""The DEQ study's report: Table-1-style summary, grid settings, figures along the dynamics."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from eqrobust.report.text import md_table

if TYPE_CHECKING:  # the report reads the results duck-typed; no runtime dependency
    from eqrobust.results_deq import DeqModelResult, DeqStudyResults

COLUMNS = (
    ("clean", "Clean"),
    ("pgd", "PGD (final)"),
    ("intermediate", "intermediate"),
    ("ensemble", "ensemble"),
    ("adjoint", "adjoint"),
    ("autoattack", "AA (interm.)"),
    ("adaptive", "adaptive"),
    ("transfer", "transfer"),
    ("square", "Square"),
    ("all", "ALL"),
)
DEFENSE_NAMES = {
    "final": "none (final state)",
    "early": "early state",
    "ensemble": "ensemble state",
    "entropy": "entropy reduction",
}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def _flag(d: Any, col: str) -> str:
    """The mark " ⚠d" when the column's number comes from a gradient that failed check (d)."""
    flag = getattr(d, "gradient_flag", None)
    return " ⚠d" if flag is not None and flag(col) else ""


def _cell(d: Any, col: str) -> str:
    if col == "clean":
        return str(d.clean)
    if col == "all":
        return f"**{d.all}**{_flag(d, col)}"
    a = d.attacks.get(col)
    return "—" if a is None else f"{a}{_flag(d, col)}"


def summary_table(results: DeqStudyResults) -> str:
    """Rows model x defence; columns Clean / attacks / ALL, each "acc [lo, hi]" (95 % Wilson)."""
    header = ["Model", "Defence"] + [c[1] for c in COLUMNS]
    rows = []
    for m in results.models:
        for d in m.defenses:
            rows.append(
                [m.name, DEFENSE_NAMES.get(d.name, d.name)] + [_cell(d, c) for c, _ in COLUMNS]
            )
    return md_table(header, rows)


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot() -> Any:
    """pyplot on the Agg backend (files only), chosen when a figure is drawn, not on import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_along(results: DeqStudyResults, what: str, path: str) -> None:
    """Mean relative residual or entropy per solver state, clean vs PGD-adversarial, per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(results.models):
        dyn = m.dynamics
        n = np.arange(1, dyn.num_states + 1)
        clean, adv = getattr(dyn, f"{what}_clean"), getattr(dyn, f"{what}_adv")
        ax.plot(n, clean, marker="o", ms=3, color=f"C{i}", label=f"{m.name} clean")
        ax.plot(n, adv, marker="x", ms=4, ls="--", color=f"C{i}", label=f"{m.name} PGD")
    ax.set_xlabel("solver state n")
    label = "||f(z_n) - z_n|| / ||f(z_n)||" if what == "residual" else "prediction entropy"
    ax.set_ylabel(label)
    if what == "residual":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_state_accuracy(m: DeqModelResult, path: str) -> None:
    """Heat map: accuracy of readout(z_n) (columns) at each attack's x_adv (rows)."""
    plt = _pyplot()
    dyn = m.dynamics
    acc = np.asarray(dyn.state_accuracy, dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * dyn.num_states, 0.8 + 0.45 * len(acc)))
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(acc):
        ax.text(
            c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k"
        )
    ax.set_xticks(range(dyn.num_states), [str(i + 1) for i in range(dyn.num_states)])
    ax.set_yticks(range(len(acc)), list(dyn.state_attacks))
    ax.set_xlabel("state z_n")
    ax.set_title(f"{m.name}: accuracy of each state", fontsize=9)
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def _grid_lines(results: DeqStudyResults) -> list[str]:
    lines = ["## Strongest intermediate-grid setting", ""]
    rows = []
    for m in results.models:
        for d in m.defenses:
            g = d.grid
            if g is None:
                continue
            best = min(g.cell_accuracy)
            rows.append(
                [
                    m.name,
                    DEFENSE_NAMES.get(d.name, d.name),
                    f"i={g.strongest_state}, K={g.strongest_unroll}, lam={g.strongest_lam:g}",
                    f"{best:.3f}",
                    str(g.accuracy),
                    f"i {min(g.states)}..{max(g.states)} x K {set(g.unrolls)} x lam "
                    f"{set(g.lams)}"
                    + (" (**reduced**: the papers' K is 1..9)" if len(g.unrolls) < 9 else ""),
                ]
            )
    header = ["Model", "Defence", "strongest (i, K, lam)", "its acc", "min over grid", "grid"]
    return lines + ([md_table(header, rows)] if rows else ["(no grid run)"]) + [""]


def _detail_lines(results: DeqStudyResults) -> list[str]:
    lines = ["## Every attack per defence", ""]
    for m in results.models:
        rows = []
        for d in m.defenses:
            for k, a in d.attacks.items():
                rows.append([DEFENSE_NAMES.get(d.name, d.name), k, f"{a}{_flag(d, k)}"])
            rows.append(
                [DEFENSE_NAMES.get(d.name, d.name), f"ALL (worst: {d.worst_attack})", str(d.all)]
            )
        notes = "; ".join(f"{d.name}: {d.note}" for d in m.defenses if d.note)
        lines += [f"### {m.name}", "", f"Early state z_{m.early_index}; {notes}", ""]
        lines += [md_table(["Defence", "attack", "accuracy [95 % CI]"], rows), ""]
    return lines


def _gradient_lines(results: DeqStudyResults) -> list[str]:
    """Check (d) per defence and white-box attack gradient: explanation and table."""
    rows = []
    for m in results.models:
        for d in m.defenses:
            for k, c in getattr(d, "gradient_checks", {}).items():
                p = c.probe
                nums = (
                    ["—"] * 3
                    if p is None
                    else [
                        f"{p.correlation:.3f}",
                        f"{p.relative_error:.3f}",
                        f"{p.zero_gradient_fraction:.0%}",
                    ]
                )
                verdict = "—" if c.passed is None else ("pass" if c.passed else "**FAIL**")
                note = c.note if p is None else ""
                rows.append(
                    [
                        m.name,
                        DEFENSE_NAMES.get(d.name, d.name),
                        k,
                        c.gradient,
                        *nums,
                        verdict + (f" ({note})" if note else ""),
                    ]
                )
    if not rows:
        return []
    gc = results.meta.get("attack", {}).get("gradient_check", {})
    skip = list(gc.get("skip", ()))
    header = [
        "Model",
        "Defence",
        "attack",
        "gradient path",
        "correlation",
        "median rel. error",
        "zero grad",
        "(d)",
    ]
    return [
        "## Gradient paths: check (d) per defence and attack",
        "",
        "A white-box attack on a defence steps along a gradient path that need not be the "
        "derivative of the prediction it is judged on: a phantom gradient, the purified input "
        "held constant, BPDA, an intermediate surrogate. Check (d) measures it on "
        f"{gc.get('images')} correctly classified test images x {gc.get('directions')} random "
        "unit directions: the path's input gradient of the prediction's true-class margin (the "
        "margin's cotangent at the prediction pulled back through the path, straight-through) "
        f"against central differences (h = {gc.get('step')}) of the defence's prediction, in "
        f"float64. It fails at correlation < {gc.get('min_correlation')}, median relative "
        f"error > {gc.get('max_relative_error')} or zero gradients on more than "
        f"{gc.get('max_zero_fraction', 0.5):.0%} of the images. In the summary, ⚠d marks a "
        "number whose attack gradient failed: it is an upper bound from a gradient that is not "
        "the prediction's; on entropy reduction's adaptive column and on ALL, ⚠d means that "
        "every gradient behind it was checked and failed. The intermediate, ensemble and AA "
        "paths differ from the prediction's derivative by design (they are surrogates); a "
        "failing *own* gradient "
        "(PGD on the final state, adaptive) means the white-box attack of that row did not "
        "follow the prediction. Not checked: transfer and Square (no gradient of the defence), "
        "the adjoint (its loss is built into the forward recursion)"
        + (
            f", and at this scale {', '.join(skip)} (config attack.gradient_check.skip)"
            if skip
            else ""
        )
        + ".",
        "",
        md_table(header, rows),
        "",
    ]


def _ep_lines(results: DeqStudyResults) -> list[str]:
    e = results.ep
    if e is None:
        return []
    g = e.grid
    header = ["Model", "Clean", "PGD (final)", "intermediate", "ensemble", "ALL"]
    row = [e.name, str(e.clean), str(e.pgd), str(e.intermediate), str(e.ensemble), f"**{e.all}**"]
    return [
        "## EP-CNN under the intermediate attacks (free-phase trajectory)",
        "",
        md_table(header, [row]),
        "",
        f"Strongest grid cell: i={g.strongest_state}, K={g.strongest_unroll}, "
        f"lam={g.strongest_lam:g} ({len(g.states)} states of {e.num_states}).",
        "",
    ]


def _radius(r: tuple[float, ...]) -> str:
    q10, q50, q90 = np.quantile(np.asarray(r), [0.1, 0.5, 0.9])
    return f"{q50:.3f} [{q10:.3f} - {q90:.3f}], {np.mean(np.asarray(r) >= 0.999):.2f}"


def _spectrum_lines(results: DeqStudyResults) -> list[str]:
    """Spectral radius of the cell's Jacobian at z*, clean vs PGD (when measured)."""
    rows = [
        [m.name, _radius(m.dynamics.spectral_radius_clean), _radius(m.dynamics.spectral_radius_adv)]
        for m in results.models
        if m.dynamics.spectral_radius_clean
    ]
    if not rows:
        return []
    return [
        "Spectral radius of df/dz at the solver's z* per test image (Arnoldi on Jacobian-vector "
        "products; median [q10 - q90], fraction >= 0.999): at |lambda| >= 1 the fixed point is "
        "not attracting and the solver's state is a transient, not an equilibrium.",
        "",
        md_table(["model", "clean x", "PGD x_adv (final state)"], rows),
        "",
    ]


def write_deq_report(results: DeqStudyResults, out_dir: str) -> dict[str, str]:
    """Writes deq_report.md and its PNG figures into out_dir.

    Returns:
        {artefact key: path}.
    """
    os.makedirs(out_dir, exist_ok=True)
    files = {"residual": "deq_residual.png", "entropy": "deq_entropy.png"}
    plot_along(results, "residual", os.path.join(out_dir, files["residual"]))
    plot_along(results, "entropy", os.path.join(out_dir, files["entropy"]))
    for m in results.models:
        files[f"states_{m.key}"] = f"deq_states_{_slug(m.key)}.png"
        plot_state_accuracy(m, os.path.join(out_dir, files[f"states_{m.key}"]))
    meta = results.meta
    a = meta.get("attack", {})
    aa = a.get("autoattack", {})
    standard = {"steps": 100, "queries": 5000, "targets": 9}  # AutoAttack's standard budget
    reduced = any(aa.get(k, v) < v for k, v in standard.items())
    aa_reduced = " (reduced budget: weaker than standard AutoAttack)" if reduced else ""
    lines = [
        f"# {meta.get('title', 'DEQ robustness study')}",
        "",
        f"Dataset {meta.get('dataset')} ({meta.get('scale')} scale): the same "
        f"{meta.get('num_test')} test images for every model, defence and attack; early state "
        f"selected on {meta.get('num_val')} validation images. Linf eps = "
        f"{a.get('eps', float('nan')):.4f}, PGD-{a.get('steps')} with step "
        f"{a.get('step_size', float('nan')):.4f}; Square {a.get('queries')} queries. Success is "
        "judged on the prediction the defended model makes; an example counts as robust only when "
        "it is right on x and on the attack's x_adv. Every cell: accuracy [95 % Wilson interval]. "
        "ALL: robust under every attack (per example).",
        "",
        "## Summary (model x defence)",
        "",
        summary_table(results),
        "",
        "PGD (final): PGD on the undefended DEQ's final state with its own gradient path (for a "
        "defence: transferred). intermediate: minimum over the unrolled-intermediate grid; "
        "ensemble: gradient-ensemble PGD; adjoint: simultaneous-adjoint PGD (sum over n); "
        "AA (interm.): AutoAttack whose gradients come from the intermediate surrogate "
        f"(z_{aa.get('state')}, K = {aa.get('unroll')}, lam {aa.get('lam')}; paper 5's AA column), "
        f"judged on the prediction; {aa.get('steps')} APGD/FAB iterations, {aa.get('targets')} "
        f"targets, {aa.get('queries')} Square queries{aa_reduced}; "
        "adaptive: PGD through the defence's own forward (entropy reduction: worst of "
        "phantom / full / BPDA); transfer: worst over the undefended DEQ's x_adv.",
        "",
    ]
    lines += _gradient_lines(results)
    lines += _grid_lines(results) + _detail_lines(results) + _ep_lines(results)
    lines += [
        "## Along the dynamics",
        "",
        f"![residual]({files['residual']})",
        "",
        f"![entropy]({files['entropy']})",
        "",
    ]
    lines += [f"![{m.name}]({files[f'states_{m.key}']})" for m in results.models] + [""]
    lines += _spectrum_lines(results)
    lines += ["## Timing (s)", ""]
    if meta.get("lanes", 1) > 1:
        lines += [
            "Two lanes on two host devices: the EP-CNN and each DEQ's entropy-reduction row ran "
            "beside the other stages, so the stages below sum to more than the total.",
            "",
        ]
    lines += [f"- {k}: {v:.1f}" for k, v in meta.get("timing", {}).items()]
    for m in results.models:
        lines += [f"- {m.name} / {k}: {v:.1f}" for k, v in m.timing.items()]
    with open(os.path.join(out_dir, "deq_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    paths = {k: os.path.join(out_dir, v) for k, v in files.items()}
    paths["report"] = os.path.join(out_dir, "deq_report.md")
    return paths
