"""Results dict -> report.md, results.json, PNG plots and a perturbation gallery."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from eqrobust.attacks.autoattack import is_reduced  # noqa: E402
from eqrobust.evaluation import ATTACKS, HEALTH_CHECKS, SCHEMA_VERSION, cell_flags  # noqa: E402

PLOTS = {
    "attacks": "accuracy_vs_eps.png",
    "corruptions": "corruptions.png",
    "free_phase": "ep_free_phase.png",
    "attack_depth": "attack_depth.png",
}


# ----------------------------------------------------------------------------------------------
# Schema


class _S:
    """Tiny schema language: type checks with optional/nullable keys (no jsonschema here)."""

    def __init__(self, kind, fields=None, item=None, nullable=False):
        self.kind, self.fields, self.item, self.nullable = kind, fields or {}, item, nullable


def _num(nullable=False):
    return _S("number", nullable=nullable)


def _int(nullable=False):
    return _S("int", nullable=nullable)


def _list(item, nullable=False):
    return _S("list", item=item, nullable=nullable)


def _obj(fields, nullable=False):
    return _S("object", fields=fields, nullable=nullable)


_CHECK = _obj(
    dict(
        id=_S("str"),
        attack=_S("str"),
        value=_num(nullable=True),
        passed=_S("bool"),
        message=_S("str"),
    )
)
_ATTACK = _obj(
    dict(
        label=_S("str"),
        norm=_S("str"),
        box=_S("str"),
        param=_S("str"),
        values=_list(_num()),
        accuracy=_list(_num()),
        n=_int(),
        settings=_S("dict"),
        large=_obj(dict(value=_num(), accuracy=_num(), n=_int()), nullable=True),
    )
)
_MODEL = _obj(
    dict(
        name=_S("str"),
        seed=_int(),
        num_test=_int(),
        clean=_obj(dict(accuracy=_num(), n=_int())),
        gradient=_obj(
            dict(
                mode=_S("str"),
                gradient_depth=_int(nullable=True),
                prediction_depth=_int(nullable=True),
                matches_prediction=_S("bool"),
            )
        ),
        attacks=_S("map", item=_ATTACK),
        corruptions=_obj(
            dict(
                n=_int(),
                severities=_list(_int()),
                accuracy=_S("map", item=_list(_num())),
                per_severity=_list(_num()),
                mean=_num(nullable=True),
            ),
            nullable=True,
        ),
        ep=_obj(
            dict(
                prediction_depth=_int(nullable=True),
                free_phase=_obj(
                    dict(steps=_list(_int()), accuracy=_list(_num()), n=_int()), nullable=True
                ),
                attack_depth=_obj(
                    dict(
                        attack=_S("str"),
                        values=_list(_num()),
                        n=_int(),
                        variants=_list(
                            _obj(
                                dict(
                                    mode=_S("str"),
                                    gradient_depth=_int(nullable=True),
                                    prediction_depth=_int(nullable=True),
                                    matches_prediction=_S("bool"),
                                    accuracy=_list(_num()),
                                )
                            )
                        ),
                    ),
                    nullable=True,
                ),
            ),
            nullable=True,
        ),
        health=_list(_CHECK),
        mean_robustness=_num(nullable=True),
        seconds=_S("map", item=_num()),
    )
)
RESULTS_SCHEMA = _obj(dict(schema_version=_int(), meta=_S("dict"), models=_list(_MODEL)))


def _validate(value, schema: _S, path: str) -> None:
    if value is None:
        if schema.nullable:
            return
        raise ValueError(f"results{path}: expected {schema.kind}, got null")
    kind = schema.kind
    ok = {
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list | tuple),
        "object": isinstance(value, dict),
        "dict": isinstance(value, dict),
        "map": isinstance(value, dict),
    }[kind]
    if not ok:
        raise ValueError(f"results{path}: expected {kind}, got {type(value).__name__}")
    if kind == "number" and not math.isfinite(value) and not math.isnan(value):
        raise ValueError(f"results{path}: expected a finite number, got {value}")
    if kind == "list":
        for i, v in enumerate(value):
            _validate(v, schema.item, f"{path}[{i}]")
    elif kind == "map":
        for k, v in value.items():
            _validate(v, schema.item, f"{path}[{k!r}]")
    elif kind == "object":
        for k, sub in schema.fields.items():
            if k not in value:
                raise ValueError(f"results{path}: missing key {k!r}")
            _validate(value[k], sub, f"{path}.{k}")


def validate_results(results: dict[str, Any]) -> None:
    """Raises ValueError naming the first offending path if `results` breaks the schema.

    Beyond types: accuracies in [0, 1], one accuracy per strength, checks (a)-(d) present,
    and a known schema version.
    """
    _validate(results, RESULTS_SCHEMA, "")
    if results["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"schema_version {results['schema_version']} != {SCHEMA_VERSION}")
    if not results["models"]:
        raise ValueError("results.models is empty")
    for m in results["models"]:
        where = f"model {m['name']!r} (seed {m['seed']})"
        accs = [m["clean"]["accuracy"]]
        for aname, a in m["attacks"].items():
            if aname not in ATTACKS:
                raise ValueError(f"{where}: unknown attack {aname!r}")
            if len(a["values"]) != len(a["accuracy"]):
                raise ValueError(
                    f"{where}: {aname} has {len(a['values'])} strengths but "
                    f"{len(a['accuracy'])} accuracies"
                )
            accs += a["accuracy"]
        for a in accs:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"{where}: accuracy {a} outside [0, 1]")
        ids = {c["id"] for c in m["health"]}
        if "d" not in ids:
            raise ValueError(f"{where}: health check (d) missing")
        if any(a["large"] is not None for a in m["attacks"].values()) and "a" not in ids:
            raise ValueError(f"{where}: health check (a) missing although large-eps runs exist")


# ----------------------------------------------------------------------------------------------
# Aggregation over seeds


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and 95 % confidence half-width (Student t) of per-seed values; None for one seed."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return float("nan"), None
    if v.size == 1:
        return float(v[0]), None
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def group_by_name(results: dict[str, Any]) -> dict[str, list[dict]]:
    """Per-model runs grouped by name, in first-appearance order."""
    groups: dict[str, list[dict]] = {}
    for m in results["models"]:
        groups.setdefault(m["name"], []).append(m)
    return groups


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    mean, half = mean_ci(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if half is None else f"±{half:.{digits}f}")


def _flag_str(runs: list[dict], attack: str, value: float | None) -> str:
    flags = sorted({f for m in runs for f in cell_flags(m["health"], attack, value)})
    return " ⚠" + ",".join(flags) if flags else ""


def _value_label(param: str, v: float) -> str:
    if param == "eps" and v < 0.1 and abs(v * 255 - round(v * 255)) < 1e-6:
        return f"ε={round(v * 255)}/255"
    return f"{'ε' if param == 'eps' else 'c'}={v:g}"


# ----------------------------------------------------------------------------------------------
# JSON


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(results: dict[str, Any], gallery_files: dict[str, str] | None = None) -> dict:
    """JSON-ready copy: gallery images replaced by their PNG file name."""
    out = dict(results)
    models = []
    for m in results["models"]:
        m = dict(m)
        g = m.pop("gallery", None)
        if g is not None:
            g = {k: v for k, v in g.items() if not isinstance(v, np.ndarray)}
            g["file"] = (gallery_files or {}).get(_run_id(m))
            m["gallery"] = g
        models.append(m)
    out["models"] = models
    return _jsonable(out)


def _run_id(m: dict) -> str:
    return f"{m['name']}#{m['seed']}"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


# ----------------------------------------------------------------------------------------------
# Plots


def _errorbar(ax, x, runs_values: list[list[float]], label: str, **kw):
    arr = np.asarray(runs_values, dtype=np.float64)  # [seeds, points]
    stats_ = [mean_ci(arr[:, i]) for i in range(arr.shape[1])]
    mean = [s[0] for s in stats_]
    err = [s[1] or 0.0 for s in stats_]
    if arr.shape[0] > 1:
        ax.errorbar(x, mean, yerr=err, label=label, capsize=3, marker="o", ms=3, **kw)
    else:
        ax.plot(x, mean, label=label, marker="o", ms=3, **kw)


def _accuracy_axis(ax: Any) -> None:
    """An accuracy y-axis in [0, 1] with a light grid (every accuracy plot)."""
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: str) -> None:
    """Lay out, write the PNG, and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attacks(results: dict[str, Any], path: str) -> None:
    """Accuracy vs attack strength, one panel per attack, every model a line."""
    groups = group_by_name(results)
    names = [a for a in ATTACKS if any(a in m["attacks"] for m in results["models"])]
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(3.6 * max(len(names), 1), 3.2))
    axes = np.atleast_1d(axes)
    for ax, aname in zip(axes, names, strict=False):
        spec = ATTACKS[aname]
        for mname, runs in groups.items():
            runs = [m for m in runs if aname in m["attacks"]]
            if not runs:
                continue
            vals = runs[0]["attacks"][aname]["values"]
            xs = [0.0] + vals
            ys = [[m["clean"]["accuracy"]] + m["attacks"][aname]["accuracy"] for m in runs]
            if spec.param == "eps" and spec.norm == "linf":
                xs = [v * 255 for v in xs]
            _errorbar(ax, xs, ys, mname)
        ax.set_title(spec.label)
        ax.set_xlabel("ε × 255" if spec.param == "eps" and spec.norm == "linf" else spec.param)
        if spec.param == "c":
            ax.set_xscale("symlog", linthresh=1e-3)
        _accuracy_axis(ax)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_corruptions(results: dict[str, Any], path: str) -> None:
    """Mean corruption accuracy vs severity (severity 0 = clean), every model a line."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for mname, runs in group_by_name(results).items():
        runs = [m for m in runs if m["corruptions"]]
        if not runs:
            continue
        xs = [0] + runs[0]["corruptions"]["severities"]
        ys = [[m["clean"]["accuracy"]] + m["corruptions"]["per_severity"] for m in runs]
        _errorbar(ax, xs, ys, mname)
    ax.set_xlabel("corruption severity")
    ax.set_ylabel("accuracy (mean over corruptions)")
    _accuracy_axis(ax)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_free_phase(results: dict[str, Any], path: str) -> None:
    """Clean accuracy of the readout at every free-phase step (paper Fig. 4a)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for mname, runs in group_by_name(results).items():
        runs = [m for m in runs if m["ep"] and m["ep"]["free_phase"]]
        if not runs:
            continue
        fp = runs[0]["ep"]["free_phase"]
        _errorbar(ax, fp["steps"], [m["ep"]["free_phase"]["accuracy"] for m in runs], mname)
    ax.set_xlabel("free-phase step t")
    ax.set_ylabel("clean accuracy")
    _accuracy_axis(ax)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_attack_depth(results: dict[str, Any], path: str) -> None:
    """Robust accuracy vs depth of the attack gradient (BPTT t), implicit as a dashed line."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    k = 0
    for mname, runs in group_by_name(results).items():
        runs = [m for m in runs if m["ep"] and m["ep"]["attack_depth"]]
        if not runs:
            continue
        ad = runs[0]["ep"]["attack_depth"]
        spec = ATTACKS[ad["attack"]]
        for j, v in enumerate(ad["values"]):
            color = colors[k % len(colors)]
            k += 1
            bptt = [
                (row["gradient_depth"], i)
                for i, row in enumerate(ad["variants"])
                if row["mode"] == "bptt"
            ]
            bptt.sort()
            label = f"{mname} {spec.label} {_value_label(spec.param, v)}"
            if bptt:
                xs = [d for d, _ in bptt]
                ys = [
                    [m["ep"]["attack_depth"]["variants"][i]["accuracy"][j] for _, i in bptt]
                    for m in runs
                ]
                _errorbar(ax, xs, ys, label + " (BPTT)", color=color)
            for i, row in enumerate(ad["variants"]):
                if row["mode"] != "bptt":
                    acc = mean_ci(
                        [m["ep"]["attack_depth"]["variants"][i]["accuracy"][j] for m in runs]
                    )[0]
                    ax.axhline(
                        acc, color=color, ls="--", lw=1, label=f"{label} ({row['mode']} gradient)"
                    )
        depth = runs[0]["ep"]["prediction_depth"]
        if depth:
            ax.axvline(depth, color="gray", ls=":", lw=1)
    ax.set_xlabel("attack-gradient depth t (prediction always at T, dotted)")
    ax.set_ylabel("robust accuracy")
    _accuracy_axis(ax)
    ax.legend(fontsize=6)
    _save(fig, path)


def _show(ax, img: np.ndarray, title: str) -> None:
    if img.shape[-1] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(img, 0, 1))
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def plot_gallery(model: dict[str, Any], path: str, class_names: Sequence[str] | None = None):
    """Clean / adversarial / amplified difference for the gallery images of one model."""
    g = model["gallery"]
    clean, adv = np.asarray(g["clean"]), np.asarray(g["adversarial"])
    n = len(clean)
    diff = adv - clean
    fig, axes = plt.subplots(3, n, figsize=(1.5 * n, 4.8), squeeze=False)
    name = lambda k: class_names[k] if class_names else str(k)
    for i in range(n):
        d = diff[i]
        scale = float(np.abs(d).max())
        amp = 0.5 / scale if scale > 0 else 1.0
        _show(
            axes[0, i],
            clean[i],
            f"clean: {name(g['pred_clean'][i])}\n(label {name(g['labels'][i])})",
        )
        _show(
            axes[1, i],
            adv[i],
            f"adv: {name(g['pred_adversarial'][i])}\n‖δ‖₂={np.linalg.norm(d):.2f}",
        )
        _show(axes[2, i], 0.5 + amp * d, f"δ × {amp:.1f}")
    spec = ATTACKS[g["attack"]]
    fig.suptitle(f"{model['name']}: {spec.label} {_value_label(spec.param, g['eps'])}", fontsize=9)
    _save(fig, path)


# ----------------------------------------------------------------------------------------------
# Markdown


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _subset_note(n: int, total: int) -> str:
    return f"all {total} test images" if n >= total else f"**subset: {n} of {total} test images**"


def _subset_notes(ns: dict[str, int], total: int) -> str:
    """One note when every model used the same examples, else one per model."""
    if len(set(ns.values())) <= 1:
        return _subset_note(next(iter(ns.values())), total)
    return "; ".join(f"{name}: {_subset_note(n, total)}" for name, n in ns.items())


def summary_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Paper Table 1 extended: clean, per-attack mean over strengths, corruptions, mean."""
    groups = group_by_name(results)
    anames = [a for a in ATTACKS if any(a in m["attacks"] for m in results["models"])]
    header = ["Model", "Clean"] + [ATTACKS[a].label + " (mean)" for a in anames]
    header += ["Corruptions (mean)", "Mean robustness", "Failed health checks"]
    rows = []
    for mname, runs in groups.items():
        row = [mname, _fmt([m["clean"]["accuracy"] for m in runs])]
        for a in anames:
            vals = [float(np.mean(m["attacks"][a]["accuracy"])) for m in runs if a in m["attacks"]]
            row.append(_fmt(vals) + _flag_str(runs, a, None) if vals else "–")
        cor = [m["corruptions"]["mean"] for m in runs if m["corruptions"]]
        row.append(_fmt(cor) if cor else "–")
        row.append(_fmt([m["mean_robustness"] for m in runs]))
        failed = sorted({c["id"] for m in runs for c in m["health"] if not c["passed"]})
        row.append(", ".join(f"({f})" for f in failed) if failed else "none")
        rows.append(row)
    return header, rows


def markdown(results: dict[str, Any], files: dict[str, Any]) -> str:
    """The report text; `files` maps plot keys and gallery run ids to relative file names."""
    meta = results["meta"]
    groups = group_by_name(results)
    first = results["models"][0]
    total = first["num_test"]
    out = [f"# {meta.get('title', 'Robustness study')}", ""]
    desc = [f"- dataset: {meta.get('dataset', '?')}, test split: {total} images"]
    if "scale" in meta:
        desc.append(f"- scale: `{meta['scale']}`")
    seeds = {n: sorted(m["seed"] for m in r) for n, r in groups.items()}
    desc.append(
        "- models (seeds): "
        + ", ".join(f"{n} ({', '.join(map(str, s))})" for n, s in seeds.items())
    )
    if any(len(s) > 1 for s in seeds.values()):
        desc.append("- numbers are mean ± 95 % CI (Student t) over seeds")
    for note in meta.get("notes", []):
        desc.append(f"- {note}")
    out += desc + [""]

    out += ["## Examples evaluated", ""]
    runs0 = [r[0] for r in groups.values()]
    n_rows = [["clean accuracy", _subset_notes({m["name"]: m["clean"]["n"] for m in runs0}, total)]]
    for a in ATTACKS:
        ns = {m["name"]: m["attacks"][a]["n"] for m in runs0 if a in m["attacks"]}
        if ns:
            n_rows.append([ATTACKS[a].label, _subset_notes(ns, total)])
    ns = {m["name"]: m["corruptions"]["n"] for m in runs0 if m["corruptions"]}
    if ns:
        n_rows.append(["corruptions", _subset_notes(ns, total)])
    for m in runs0:
        if m["ep"] and m["ep"]["attack_depth"]:
            n_rows.append(
                [
                    f"EP attack-depth analysis ({m['name']})",
                    _subset_note(m["ep"]["attack_depth"]["n"], total),
                ]
            )
    out += [md_table(["evaluation", "examples"], n_rows), ""]
    if any("**subset" in r[1] for r in n_rows):
        out += [
            "Attacks marked *subset* ran on the first examples of one fixed random "
            "permutation of the test split (the same images for every model and attack; "
            "subsets are nested), to fit the time budget of this scale.",
            "",
        ]

    out += ["## Summary (paper Table 1: mean robustness over attacks and strengths)", ""]
    header, rows = summary_rows(results)
    out += [md_table(header, rows), ""]
    out += [
        "Mean robustness = mean robust accuracy over every attack and strength of the grid "
        "below (large-ε sanity points excluded). ⚠x marks a cell where health check (x) "
        "failed (see *Health checks*).",
        "",
    ]

    out += ["## Adversarial attacks", ""]
    if "attacks" in files:
        out += [f"![accuracy vs attack strength]({files['attacks']})", ""]
    for a in ATTACKS:
        runs_by = {n: [m for m in r if a in m["attacks"]] for n, r in groups.items()}
        runs_by = {n: r for n, r in runs_by.items() if r}
        if not runs_by:
            continue
        spec = ATTACKS[a]
        res0 = next(iter(runs_by.values()))[0]["attacks"][a]
        header = ["Model", "Clean"] + [_value_label(spec.param, v) for v in res0["values"]]
        if res0["large"] is not None:
            header.append(f"(a) {_value_label(spec.param, res0['large']['value'])}")
        rows = []
        for n, runs in runs_by.items():
            row = [n, _fmt([m["clean"]["accuracy"] for m in runs])]
            for j, v in enumerate(res0["values"]):
                row.append(
                    _fmt([m["attacks"][a]["accuracy"][j] for m in runs]) + _flag_str(runs, a, v)
                )
            if res0["large"] is not None:
                row.append(
                    _fmt([m["attacks"][a]["large"]["accuracy"] for m in runs])
                    + (
                        " ⚠a"
                        if "a" in {f for m in runs for f in cell_flags(m["health"], a, None)}
                        else ""
                    )
                )
            rows.append(row)
        per = {
            n: ", ".join(f"{k}={v}" for k, v in runs[0]["attacks"][a]["settings"].items())
            for n, runs in runs_by.items()
        }
        settings = (
            next(iter(per.values()))
            if len(set(per.values())) == 1
            else "; ".join(f"{n}: {v}" for n, v in per.items())
        )
        ns = {n: runs[0]["attacks"][a]["n"] for n, runs in runs_by.items()}
        if a == "autoattack_linf" and any(
            is_reduced(runs[0]["attacks"][a]["settings"]) for runs in runs_by.values()
        ):
            settings += "; **reduced budget: weaker than standard AutoAttack**"
        out += [
            f"### {spec.label} ({spec.box}-box; {settings})",
            "",
            md_table(header, rows),
            "",
            f"Examples: {_subset_notes(ns, total)}.",
            "",
        ]

    out += ["## Natural corruptions", ""]
    cor_groups = {n: [m for m in r if m["corruptions"]] for n, r in groups.items()}
    cor_groups = {n: r for n, r in cor_groups.items() if r}
    if cor_groups:
        if "corruptions" in files:
            out += [f"![corruption accuracy vs severity]({files['corruptions']})", ""]
        c0 = next(iter(cor_groups.values()))[0]["corruptions"]
        header = ["Model", "Clean"] + [f"severity {s}" for s in c0["severities"]] + ["mean"]
        rows = []
        for n, runs in cor_groups.items():
            row = [n, _fmt([m["clean"]["accuracy"] for m in runs])]
            row += [
                _fmt([m["corruptions"]["per_severity"][i] for m in runs])
                for i in range(len(c0["severities"]))
            ]
            row.append(_fmt([m["corruptions"]["mean"] for m in runs]))
            rows.append(row)
        ns = {n: runs[0]["corruptions"]["n"] for n, runs in cor_groups.items()}
        out += [md_table(header, rows), "", f"Examples: {_subset_notes(ns, total)}.", ""]
        cnames = list(c0["accuracy"])
        header = ["Corruption (mean over severities)"] + list(cor_groups)
        rows = [
            [c]
            + [
                _fmt([float(np.mean(m["corruptions"]["accuracy"][c])) for m in runs])
                for runs in cor_groups.values()
            ]
            for c in cnames
        ]
        out += [md_table(header, rows), ""]
    else:
        out += ["Not run.", ""]

    out += ["## EP analyses", ""]
    ep_groups = {n: [m for m in r if m["ep"]] for n, r in groups.items()}
    ep_groups = {n: r for n, r in ep_groups.items() if r}
    if not ep_groups:
        out += ["No model with free-phase dynamics in this study.", ""]
    for n, runs in ep_groups.items():
        ep = runs[0]["ep"]
        if ep["free_phase"]:
            fp = ep["free_phase"]
            out += [
                f"### {n}: accuracy along the free phase (prediction depth T = "
                f"{ep['prediction_depth']})",
                "",
            ]
            if "free_phase" in files:
                out += [f"![accuracy vs free-phase step]({files['free_phase']})", ""]
            steps = fp["steps"]
            show = sorted(
                {s for s in steps if s in (1, 2, 3, 4, 5) or s % max(1, len(steps) // 10) == 0}
                | {steps[-1]}
            )
            idx = [steps.index(s) for s in show]
            out += [
                md_table(
                    ["t"] + [str(s) for s in show],
                    [
                        ["accuracy"]
                        + [_fmt([m["ep"]["free_phase"]["accuracy"][i] for m in runs]) for i in idx]
                    ],
                ),
                "",
                f"Examples: {_subset_note(fp['n'], total)}.",
                "",
            ]
        if ep["attack_depth"]:
            ad = ep["attack_depth"]
            spec = ATTACKS[ad["attack"]]
            out += [
                f"### {n}: robust accuracy vs attack-gradient path ({spec.label}; "
                f"prediction always at depth T = {ep['prediction_depth']})",
                "",
            ]
            if "attack_depth" in files:
                out += [f"![robust accuracy vs attack depth]({files['attack_depth']})", ""]
            header = ["gradient", "depth", "(d) matches prediction"] + [
                _value_label(spec.param, v) for v in ad["values"]
            ]
            rows = []
            for i, row in enumerate(ad["variants"]):
                rows.append(
                    [
                        row["mode"],
                        str(row["gradient_depth"]),
                        "yes" if row["matches_prediction"] else "NO ⚠d",
                    ]
                    + [
                        _fmt([m["ep"]["attack_depth"]["variants"][i]["accuracy"][j] for m in runs])
                        for j in range(len(ad["values"]))
                    ]
                )
            out += [
                md_table(header, rows),
                "",
                "Rows with a gradient shallower than the prediction reproduce the published "
                "protocol (gradient/prediction mismatch, flagged (d)); the implicit row is the "
                "exact gradient of the fixed point the prediction reads.",
                f"Examples: {_subset_note(ad['n'], total)}.",
                "",
            ]

    out += ["## Health checks", ""]
    out += [f"- ({k}) {v}" for k, v in HEALTH_CHECKS.items()] + [""]
    for m in results["models"]:
        out += [f"### {m['name']} (seed {m['seed']})", ""]
        rows = [
            [f"({c['id']})", "PASS" if c["passed"] else "**FAIL**", c["message"]]
            for c in m["health"]
        ]
        out += [md_table(["check", "result", "detail"], rows), ""]

    out += ["## Perturbation gallery", ""]
    gal = [(m, files.get(_run_id(m))) for m in results["models"]]
    gal = [(m, f) for m, f in gal if f]
    if gal:
        g0 = gal[0][0]["gallery"]
        spec = ATTACKS[g0["attack"]]
        out += [
            f"The same test images attacked with {spec.label} "
            f"{_value_label(spec.param, g0['eps'])} on every model: clean (top), adversarial "
            "(middle) and the perturbation amplified to full range (bottom; grey = 0).",
            "",
        ]
        for m, f in gal:
            out += [f"### {m['name']} (seed {m['seed']})", "", f"![gallery {m['name']}]({f})", ""]
    else:
        out += ["No gallery images.", ""]

    timing = meta.get("timing")
    out += ["## Time budget", ""]
    rows = []
    if timing:
        for k, v in timing.items():
            rows.append([k, f"{v:.1f}"])
    for m in results["models"]:
        rows.append(
            [
                f"evaluate {m['name']} (seed {m['seed']})",
                f"{sum(m['seconds'].values()):.1f} ("
                + ", ".join(f"{k} {v:.1f}" for k, v in m["seconds"].items())
                + ")",
            ]
        )
    out += [md_table(["stage", "seconds"], rows), ""]
    return "\n".join(out)


def write_report(results: dict[str, Any], workdir: str) -> dict[str, str]:
    """Writes report.md, results.json, the four plots and one gallery PNG per model run.

    Returns:
      Mapping from artefact key to its path.
    """
    os.makedirs(workdir, exist_ok=True)
    paths: dict[str, str] = {}
    files: dict[str, str] = {}
    models = results["models"]
    plotters = {
        "attacks": (plot_attacks, any(m["attacks"] for m in models)),
        "corruptions": (plot_corruptions, any(m["corruptions"] for m in models)),
        "free_phase": (plot_free_phase, any(m["ep"] and m["ep"]["free_phase"] for m in models)),
        "attack_depth": (
            plot_attack_depth,
            any(m["ep"] and m["ep"]["attack_depth"] for m in models),
        ),
    }
    for key, (fn, has) in plotters.items():
        if has:
            fn(results, os.path.join(workdir, PLOTS[key]))
            files[key] = PLOTS[key]
    for m in models:
        if m.get("gallery") is not None and "clean" in m["gallery"]:
            fname = f"gallery_{_slug(m['name'])}_seed{m['seed']}.png"
            plot_gallery(m, os.path.join(workdir, fname), results["meta"].get("class_names"))
            files[_run_id(m)] = fname
    js = to_json(results, files)
    validate_results(js)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(js, f, indent=1)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(markdown(results, files))
    paths = {k: os.path.join(workdir, v) for k, v in files.items()}
    paths["report"] = os.path.join(workdir, "report.md")
    paths["json"] = os.path.join(workdir, "results.json")
    return paths
