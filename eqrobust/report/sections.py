"""The report's sections: one renderer each, `(results, files) -> markdown lines`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from eqrobust.report.text import (
    flag_str,
    fmt,
    fmt_acc,
    fmt_mean_acc,
    md_table,
    subset_note,
    subset_notes,
    value_label,
)
from eqrobust.results import HEALTH_CHECKS, ModelResult, StudyResults

Files = dict[str, str]
Section = Callable[[StudyResults, Files], list[str]]


def _total(results: StudyResults) -> int:
    return results.models[0].num_test


def _attack_names(results: StudyResults) -> list[str]:
    """Attack keys in evaluation order (that of the model with the most attacks first)."""
    models = sorted(results.models, key=lambda m: -len(m.attacks))
    return list(dict.fromkeys(a for m in models for a in m.attacks))


def header(results: StudyResults, files: Files) -> list[str]:
    """Title and what was evaluated."""
    meta = results.meta
    out = [f"# {meta.get('title', 'Robustness study')}", ""]
    out.append(f"- dataset: {meta.get('dataset', '?')}, test split: {_total(results)} images")
    if "scale" in meta:
        out.append(f"- scale: `{meta['scale']}`")
    seeds = {n: sorted(m.seed for m in r) for n, r in results.by_name().items()}
    out.append(
        "- models (seeds): "
        + ", ".join(f"{n} ({', '.join(map(str, s))})" for n, s in seeds.items())
    )
    if any(len(s) > 1 for s in seeds.values()):
        out.append("- numbers are mean ± 95 % CI (Student t) over seeds")
    out += [f"- {note}" for note in meta.get("notes", [])]
    return out + [""]


def models(results: StudyResults, files: Files) -> list[str]:
    """How each model was trained (the study's `meta["training"]` lines), when known."""
    lines = results.meta.get("training", [])
    if not lines:
        return []
    return ["## Models and training", "", *[f"- {line}" for line in lines], ""]


def examples(results: StudyResults, files: Files) -> list[str]:
    """Which examples each evaluation ran on."""
    total = _total(results)
    runs0 = [r[0] for r in results.by_name().values()]
    rows = [["clean accuracy", subset_notes({m.name: m.clean.n for m in runs0}, total)]]
    for a in _attack_names(results):
        ns = {m.name: m.attacks[a].n for m in runs0 if a in m.attacks}
        label = next(m.attacks[a].label for m in runs0 if a in m.attacks)
        rows.append([label, subset_notes(ns, total)])
    ns = {m.name: m.corruptions.n for m in runs0 if m.corruptions}
    if ns:
        rows.append(["corruptions", subset_notes(ns, total)])
    for m in runs0:
        if m.dynamics and m.dynamics.attack_depth:
            n = m.dynamics.attack_depth.n
            rows.append([f"attack-depth analysis ({m.name})", subset_note(n, total)])
    out = ["## Examples evaluated", "", md_table(["evaluation", "examples"], rows), ""]
    if any("**subset" in r[1] for r in rows):
        out += [
            "Attacks marked *subset* ran on the first examples of one fixed random "
            "permutation of the test split (the same images for every model and attack; "
            "subsets are nested), to fit the time budget of this scale.",
            "",
        ]
    return out


_NORM_LABEL = {"linf": "L∞", "l2": "L2"}


def _norms(results: StudyResults) -> list[str]:
    return [
        n for n in ("linf", "l2") if any(w.norm == n for m in results.models for w in m.worst_case)
    ]


def _worst_flags(runs: list[ModelResult], norm: str, value: float | None) -> str:
    """Flags of every attack combined into a worst-case cell (all strengths when value is None)."""
    flags = set()
    for m in runs:
        for w in m.worst_case:
            if w.norm == norm and (value is None or np.isclose(w.value, value)):
                flags |= {f for a in w.attacks for f in m.cell_flags(a, w.value)}
    return " ⚠" + ",".join(sorted(flags)) if flags else ""


def _worst_mean(runs: list[ModelResult], norm: str) -> str:
    vals = [[(w.accuracy, w.n) for w in m.worst_case if w.norm == norm] for m in runs]
    vals = [v for v in vals if v]
    return (_worst_flags(runs, norm, None).strip() or fmt_mean_acc(vals)) if vals else "–"


def _n_note(ns: set[int]) -> str:
    """ ", n=200" when every model of a column ran on the same examples; a visible warning if not
    (subsets are nested prefixes, but accuracies on different n are not one comparison)."""
    if len(ns) == 1:
        return f", n={next(iter(ns))}"
    return f"; ⚠ n differs between models: {'/'.join(str(n) for n in sorted(ns))}" if ns else ""


def summary_rows(results: StudyResults) -> tuple[list[str], list[list[str]]]:
    """Paper Table 1 extended: clean, the worst case over attacks per norm (headline), per-attack
    mean over strengths, corruptions, mean."""
    anames = _attack_names(results)
    labels = {a: next(m.attacks[a].label for m in results.models if a in m.attacks) for a in anames}
    norms = _norms(results)
    wc_ns = {n: {w.n for m in results.models for w in m.worst_case if w.norm == n} for n in norms}
    head = ["Model", "Clean"]
    head += [f"**Worst case {_NORM_LABEL[n]}** (mean{_n_note(wc_ns[n])})" for n in norms]
    head += [
        labels[a] + f" (mean{_n_note({m.attacks[a].n for m in results.models if a in m.attacks})})"
        for a in anames
    ]
    head += ["Corruptions (mean)", "Mean robustness", "Failed health checks"]
    rows = []
    for mname, runs in results.by_name().items():
        row = [mname, fmt_mean_acc([[(m.clean.accuracy, m.clean.n)] for m in runs])]
        row += [_worst_mean(runs, n) for n in norms]
        for a in anames:
            vals = [
                [(v, m.attacks[a].n) for v in m.attacks[a].accuracy] for m in runs if a in m.attacks
            ]
            # A cell whose checks fail shows the flags, not a number that cannot be trusted.
            row.append((flag_str(runs, a, None).strip() or fmt_mean_acc(vals)) if vals else "–")
        cor = [
            [(v, m.corruptions.n) for accs in m.corruptions.accuracy.values() for v in accs]
            for m in runs
            if m.corruptions
        ]
        row.append(fmt_mean_acc(cor) if cor else "–")
        # Checks of attacks reported only for comparison (the papers' C&W) are listed but do not
        # replace the mean robustness, which leaves those attacks out.
        bad = [(m, c) for m in runs for c in m.health if not c.passed]
        aside = lambda m, c: c.attack in m.attacks and not m.attacks[c.attack].headline
        failed = sorted({c.id for m, c in bad if not aside(m, c)})
        others = sorted({f"({c.id}) {m.attacks[c.attack].label}" for m, c in bad if aside(m, c)})
        row.append("⚠" + ",".join(failed) if failed else fmt([m.mean_robustness for m in runs]))
        row.append(", ".join([f"({f})" for f in failed] + others) or "none")
        rows.append(row)
    return head, rows


def summary(results: StudyResults, files: Files) -> list[str]:
    """The summary table."""
    head, rows = summary_rows(results)
    return [
        "## Summary (paper Table 1: mean robustness over attacks and strengths)",
        "",
        md_table(head, rows),
        "",
        "Worst case = per example, robust only if every attack of that norm at that ε failed "
        '(AutoAttack\'s "ALL"), averaged over the ε grid: the headline, see *Worst case over '
        "attacks*. Mean robustness = mean robust accuracy over every attack and strength of the "
        "grid below (large-ε sanity points and the papers' C&W protocol, reported for comparison "
        "only, excluded; the papers' Table 1 measure, weaker). ⚠x "
        "replaces a number whose health check (x) failed (see *Health checks*; the tables below "
        "keep the numbers, flagged).",
        "",
    ]


def worst_case(results: StudyResults, files: Files) -> list[str]:
    """Per norm: the per-example worst case over attacks at each ε, with intervals."""
    out = []
    for norm in _norms(results):
        values = sorted(
            {round(w.value, 12) for m in results.models for w in m.worst_case if w.norm == norm}
        )
        head = ["Model", "Clean"] + [value_label("eps", v) for v in values]
        rows, combined = [], {}
        for mname, runs in results.by_name().items():
            row = [mname, fmt_acc([m.clean.accuracy for m in runs], runs[0].clean.n)]
            for v in values:
                ws = [
                    w
                    for m in runs
                    for w in m.worst_case
                    if w.norm == norm and np.isclose(w.value, v)
                ]
                if not ws:
                    row.append("–")
                    continue
                combined[mname] = ", ".join(ws[0].attacks)
                cell = fmt_acc([w.accuracy for w in ws], ws[0].n) + f" (n={ws[0].n})"
                row.append(cell + _worst_flags(runs, norm, v))
            rows.append(row)
        out += [f"### {_NORM_LABEL[norm]}", "", md_table(head, rows), ""]
        out += [f"Attacks combined: {'; '.join(f'{k}: {v}' for k, v in combined.items())}.", ""]
    if not out:
        return []
    return [
        "## Worst case over attacks",
        "",
        "An example counts as robust at ε only if it survived every attack of that norm run at "
        "that ε (on the smallest of their nested subsets, n). Brackets: 95 % Wilson interval.",
        "",
        *out,
    ]


def _attack_table(a: str, runs_by: dict[str, list[ModelResult]], total: int) -> list[str]:
    res0 = next(iter(runs_by.values()))[0].attacks[a]
    head = ["Model", "Clean"] + [value_label(res0.param, v) for v in res0.values]
    if res0.large is not None:
        head.append(f"(a) {value_label(res0.param, res0.large.value)}")
    rows = []
    for n, runs in runs_by.items():
        row = [n, fmt_acc([m.clean.accuracy for m in runs], runs[0].clean.n)]
        size = runs[0].attacks[a].n
        for j, v in enumerate(res0.values):
            cell = fmt_acc([m.attacks[a].accuracy[j] for m in runs], size)
            row.append(cell + flag_str(runs, a, v))
        if res0.large is not None:
            failed_a = "a" in {f for m in runs for f in m.cell_flags(a, None)}
            row.append(
                fmt([m.attacks[a].large.accuracy for m in runs]) + (" ⚠a" if failed_a else "")
            )
        rows.append(row)
    per = {
        n: ", ".join(f"{k}={v}" for k, v in runs[0].attacks[a].settings.items())
        for n, runs in runs_by.items()
    }
    settings = (
        next(iter(per.values()))
        if len(set(per.values())) == 1
        else "; ".join(f"{n}: {v}" for n, v in per.items())
    )
    if any(runs[0].attacks[a].reduced for runs in runs_by.values()):
        settings += f"; **reduced budget: weaker than standard {res0.label.split('-')[0]}**"
    elif a.startswith("autoattack_"):  # standard and "rand" versions alike
        settings += "; full budget of its version"
    ns = {n: runs[0].attacks[a].n for n, runs in runs_by.items()}
    return [
        f"### {res0.label} ({res0.box}-box; {settings})",
        "",
        md_table(head, rows),
        "",
        f"Examples: {subset_notes(ns, total)}. Brackets: 95 % Wilson interval of the accuracy on "
        "those examples (with several seeds: mean ± Student-t interval over seeds).",
        "",
    ]


def attacks(results: StudyResults, files: Files) -> list[str]:
    """One table per attack: robust accuracy at each strength, health flags per cell."""
    out = ["## Adversarial attacks", ""]
    if "attacks" in files:
        out += [f"![accuracy vs attack strength]({files['attacks']})", ""]
    for a in _attack_names(results):
        runs_by = {n: [m for m in r if a in m.attacks] for n, r in results.by_name().items()}
        runs_by = {n: r for n, r in runs_by.items() if r}
        out += _attack_table(a, runs_by, _total(results))
    return out


def corruptions(results: StudyResults, files: Files) -> list[str]:
    """Accuracy per severity and per corruption."""
    out = ["## Natural corruptions", ""]
    groups = {n: [m for m in r if m.corruptions] for n, r in results.by_name().items()}
    groups = {n: r for n, r in groups.items() if r}
    if not groups:
        return out + ["Not run.", ""]
    if "corruptions" in files:
        out += [f"![corruption accuracy vs severity]({files['corruptions']})", ""]
    c0 = next(iter(groups.values()))[0].corruptions
    head = ["Model", "Clean"] + [f"severity {s}" for s in c0.severities] + ["mean"]
    rows = []
    for n, runs in groups.items():
        row = [n, fmt([m.clean.accuracy for m in runs])]
        row += [
            fmt([m.corruptions.per_severity[i] for m in runs]) for i in range(len(c0.severities))
        ]
        rows.append(row + [fmt([m.corruptions.mean for m in runs])])
    ns = {n: runs[0].corruptions.n for n, runs in groups.items()}
    out += [md_table(head, rows), "", f"Examples: {subset_notes(ns, _total(results))}.", ""]
    head = ["Corruption (mean over severities)"] + list(groups)
    rows = [
        [c]
        + [
            fmt([float(np.mean(m.corruptions.accuracy[c])) for m in runs])
            for runs in groups.values()
        ]
        for c in c0.accuracy
    ]
    return out + [md_table(head, rows), ""]


def _trajectory_lines(n: str, runs: list[ModelResult], files: Files, total: int) -> list[str]:
    dyn = runs[0].dynamics
    steps = dyn.trajectory.steps
    show = sorted(
        {s for s in steps if s in (1, 2, 3, 4, 5) or s % max(1, len(steps) // 10) == 0}
        | {steps[-1]}
    )
    idx = [steps.index(s) for s in show]
    out = [
        f"### {n}: accuracy along the dynamics (prediction depth T = {dyn.prediction_depth})",
        "",
    ]
    if "trajectory" in files:
        out += [f"![accuracy along the dynamics]({files['trajectory']})", ""]
    row = ["accuracy"] + [fmt([m.dynamics.trajectory.accuracy[i] for m in runs]) for i in idx]
    return out + [
        md_table(["t"] + [str(s) for s in show], [row]),
        "",
        f"Examples: {subset_note(dyn.trajectory.n, total)}.",
        "",
    ]


def _attack_depth_lines(n: str, runs: list[ModelResult], files: Files, total: int) -> list[str]:
    dyn = runs[0].dynamics
    ad = dyn.attack_depth
    spec = runs[0].attacks.get(ad.attack)
    label, param = (spec.label, spec.param) if spec else (ad.attack, "eps")
    out = [
        f"### {n}: robust accuracy vs attack-gradient path ({label}; prediction always at "
        f"depth T = {dyn.prediction_depth})",
        "",
    ]
    if "attack_depth" in files:
        out += [f"![robust accuracy vs attack depth]({files['attack_depth']})", ""]
    head = ["gradient", "depth", "(e) declared = prediction path"] + [
        value_label(param, v) for v in ad.values
    ]
    rows = []
    for i, row in enumerate(ad.variants):
        accs = [
            fmt([m.dynamics.attack_depth.variants[i].accuracy[j] for m in runs])
            for j in range(len(ad.values))
        ]
        ok = "yes" if row.matches_prediction else "NO ⚠e"
        depth = "–" if row.gradient_depth is None else str(row.gradient_depth)
        rows.append([row.mode, depth, ok, *accs])
    return out + [
        md_table(head, rows),
        "",
        "Rows with a gradient shallower than the prediction reproduce the published "
        "protocol (gradient/prediction mismatch, flagged (e)); the implicit row is the "
        "gradient of the fixed point the prediction approximates, exact only when the free "
        "phase has converged (`benchmarks/probe_calibration.py` measures each path against "
        "finite differences of the prediction).",
        f"Examples: {subset_note(ad.n, total)}.",
        "",
    ]


def dynamics(results: StudyResults, files: Files) -> list[str]:
    """Equilibrium models: accuracy along the dynamics, robustness vs attack-gradient path."""
    out = ["## Dynamics of the equilibrium models", ""]
    groups = {n: [m for m in r if m.dynamics] for n, r in results.by_name().items()}
    groups = {n: r for n, r in groups.items() if r}
    if not groups:
        return out + ["No model with dynamics (free phase, solver) in this study.", ""]
    for n, runs in groups.items():
        if runs[0].dynamics.trajectory:
            out += _trajectory_lines(n, runs, files, _total(results))
        if runs[0].dynamics.attack_depth:
            out += _attack_depth_lines(n, runs, files, _total(results))
    return out


def inference_cost(results: StudyResults, files: Files) -> list[str]:
    """The EP-CNN against its students: images/s and map evaluations per image (study meta
    "inference_cost", measured by eqrobust/study.py with eqrobust/cost.py); none without it."""
    ic = results.meta.get("inference_cost")
    if not ic:
        return []
    clean = {m.name: m.clean for m in results.models if m.seed == results.models[0].seed}
    teacher, rows = ic["teacher"], []
    for r in ic["rows"]:
        c = clean.get(r["name"])
        rows.append(
            [
                r["name"],
                f"{r['images_per_s']:,.0f}",
                f"{r['f_evals_per_image']:g}",
                f"{r['speedup']:.1f}x",
                fmt_acc([c.accuracy], c.n) if c else "–",
                fmt_acc([r["agreement"]], ic["num_examples"]),
                fmt_acc([r["agreement_test"]], ic["num_test"]) if "agreement_test" in r else "–",
            ]
        )
    head = ["model", "images/s", "f-evals / image", f"speed-up vs {teacher}", "clean accuracy"]
    return [
        "## Inference cost",
        "",
        f"{teacher} and the students distilled from it, on the same {ic['num_examples']} "
        f"clean-accuracy examples (batch {ic['batch_size']}, jitted, compiled before timing, "
        f"best of {ic['repeats']} passes, one process, after the evaluation). f-evals / image: "
        f"evaluations of the fixed-point map, i.e. the {teacher}'s free-phase steps T1 (each one "
        "energy gradient) against one forward pass of a student. Wall-clock numbers depend on "
        "the machine's load; the ratios, measured in one process, are the ones to compare. "
        f"Agreement: the fraction of images on which a model predicts the {teacher}'s class, on "
        f"those examples and on the whole test split ({ic.get('num_test', '–')} images, the "
        "distillation's measure), with 95 % Wilson intervals.",
        "",
        md_table([*head, "agreement (these examples)", "agreement (test split)"], rows),
        "",
    ]


def spectrum(results: StudyResults, files: Files) -> list[str]:
    """The leading eigenvalue of the EP-CNN's linearised free phase at clean and adversarial
    fixed points (study meta "spectrum", eqrobust/study.py `ep_spectrum`); none without it."""
    sp = results.meta.get("spectrum")
    if not sp:
        return []
    rows = []
    for label, key in (("clean x", "radius_clean"), ("PGD-Linf x_adv", "radius_adversarial")):
        r = np.asarray(sp[key])
        q10, q50, q90 = np.quantile(r, [0.1, 0.5, 0.9])
        rows.append([label, f"{q50:.3f}", f"{q10:.3f} - {q90:.3f}", f"{np.mean(r >= 0.999):.2f}"])
    out = [
        "## Spectrum of the linearised dynamics",
        "",
        f"{sp['model']}: the leading eigenvalue modulus |lambda_max| of the Jacobian of one "
        f"free-phase update at the reached state s*, per example ({sp['krylov']} Arnoldi steps "
        f"of Jacobian-vector products, no dense Jacobian), on the first {sp['num_examples']} "
        f"evaluation examples and on their PGD-Linf points ({value_label('eps', sp['eps'])}, "
        f"{sp['steps']} steps, exact gradient; {100 * sp['fooled']:.0f} % change class). "
        "Perturbations of s* decay along directions with |lambda| < 1 and persist along "
        "|lambda| near 1 (ep-distillation eqs. 3-7); the free phase stops after T1 steps, so "
        "|lambda| > 1 at s* is possible.",
        "",
        md_table(["inputs", "median", "q10 - q90", "fraction >= 0.999"], rows),
        "",
    ]
    if "spectrum" in files:
        out += [f"![spectrum at s*]({files['spectrum']})", ""]
    return out


def health(results: StudyResults, files: Files) -> list[str]:
    """Every check of every model run."""
    out = ["## Health checks", ""] + [f"- ({k}) {v}" for k, v in HEALTH_CHECKS.items()] + [""]
    for m in results.models:
        rows = [[f"({c.id})", "PASS" if c.passed else "**FAIL**", c.message] for c in m.health]
        out += [f"### {m.name} (seed {m.seed})", "", md_table(["check", "result", "detail"], rows)]
        out += [""]
    return out


def gallery(results: StudyResults, files: Files) -> list[str]:
    """The perturbation pictures."""
    out = ["## Perturbation gallery", ""]
    gal = [(m, files[m.run_id]) for m in results.models if m.run_id in files]
    if not gal:
        return out + ["No gallery images.", ""]
    m0 = gal[0][0]
    g0 = m0.gallery
    spec = m0.attacks.get(g0.attack)
    label, param = (spec.label, spec.param) if spec else (g0.attack, "eps")
    out += [
        f"The same test images attacked with {label} {value_label(param, g0.eps)} on every "
        "model: clean (top), adversarial (middle) and the perturbation amplified to full range "
        "(bottom; grey = 0).",
        "",
    ]
    for m, f in gal:
        out += [f"### {m.name} (seed {m.seed})", "", f"![gallery {m.name}]({f})", ""]
    return out


def timing(results: StudyResults, files: Files) -> list[str]:
    """Where the time went."""
    rows = [[k, f"{v:.1f}"] for k, v in (results.meta.get("timing") or {}).items()]
    for m in results.models:
        # Keys with a dot ("attacks.pgd_l2") split a stage: listed, not added to the total.
        stages = {k: v for k, v in m.seconds.items() if "." not in k}
        detail = ", ".join(f"{k} {v:.1f}" for k, v in m.seconds.items())
        rows.append(
            [f"evaluate {m.name} (seed {m.seed})", f"{sum(stages.values()):.1f} ({detail})"]
        )
    return ["## Time budget", "", md_table(["stage", "seconds"], rows), ""]


SECTIONS: tuple[Section, ...] = (
    header,
    models,
    examples,
    summary,
    worst_case,
    attacks,
    corruptions,
    dynamics,
    inference_cost,
    spectrum,
    health,
    gallery,
    timing,
)
