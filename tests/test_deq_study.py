"""The DEQ study: the smoke run end to end (binary, JSON, report) and the results' invariants."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eqrobust.configs import deq_study as deq_study_config
from eqrobust.configs import study as study_config
from eqrobust.report.deq import summary_table, write_deq_report
from eqrobust.results import GradientProbe, wilson
from eqrobust.results_deq import (
    Acc,
    DefenseResult,
    DeqModelResult,
    DeqStudyResults,
    DynamicsAnalysis,
    GradientCheck,
    validate_deq,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_acc_carries_n_and_wilson_interval():
    a = Acc.of(np.array([True, False, True, True]))
    assert a.n == 4 and a.accuracy == 0.75
    assert (a.lo, a.hi) == pytest.approx(wilson(0.75, 4))
    assert a.lo < a.accuracy < a.hi


def _defense(clean: float, attack: float, all_: float) -> DefenseResult:
    n = 10
    acc = lambda v: Acc(v, n, *wilson(v, n))
    return DefenseResult("final", acc(clean), {"pgd": acc(attack)}, acc(all_), "pgd")


@pytest.mark.parametrize("clean,attack,all_", [(0.5, 0.6, 0.4), (0.5, 0.3, 0.4)])
def test_validation_rejects_attack_above_clean_or_all_above_attack(clean, attack, all_):
    d = _defense(clean, attack, all_)
    model = type("M", (), {"name": "m", "defenses": (d,)})()
    with pytest.raises(ValueError, match="not in \\[ALL, clean\\]"):
        validate_deq(type("R", (), {"models": (model,)})())


def _check(passed: bool | None) -> GradientCheck:
    if passed is None:
        return GradientCheck("adjoint", note="not checked")
    corr = 1.0 if passed else 0.2
    probe = GradientProbe(corr, 0.0 if passed else 0.8, 0.0, 0.0, 1e-3, 2, 2, 1e-5)
    return GradientCheck("path", probe, passed, "")


def test_gradient_checks_round_trip_and_mark_the_report(tmp_path):
    acc = lambda v: Acc(v, 10, *wilson(v, 10))
    final = DefenseResult(
        "final", acc(0.8), {"pgd": acc(0.5), "adjoint": acc(0.6)}, acc(0.4), "pgd",
        gradient_checks={"pgd": _check(False), "adjoint": _check(None)},
    )  # fmt: skip
    early = DefenseResult(
        "early", acc(0.8), {"adaptive": acc(0.3), "transfer": acc(0.6)}, acc(0.3), "adaptive",
        gradient_checks={"adaptive": _check(True)},
    )  # fmt: skip
    entropy = DefenseResult(
        "entropy", acc(0.8), {"phantom": acc(0.7), "full": acc(0.6), "adaptive": acc(0.6)},
        acc(0.6), "full", gradient_checks={"phantom": _check(False), "full": _check(False)},
    )  # fmt: skip
    assert final.gradient_flag("pgd") and not final.gradient_flag("adjoint")
    assert not final.gradient_flag("all")  # the adjoint was not checked: unknown
    assert not early.gradient_flag("adaptive") and not early.gradient_flag("all")
    assert entropy.gradient_flag("adaptive") and entropy.gradient_flag("all")
    dyn = DynamicsAnalysis(
        2, (0.1, 0.01), (0.1, 0.02), (1.0, 0.5), (1.0, 0.6), ("clean",), ((0.8, 0.8),)
    )
    model = DeqModelResult(
        "clean", "DEQ", 2, 1, (0.5, 0.4), (0.8, 0.8), (final, early, entropy), dyn, {}
    )
    meta = {"attack": {"gradient_check": {"images": 2, "directions": 2, "skip": ["bpda"]}}}
    res = DeqStudyResults((model,), None, meta)
    js = json.loads(json.dumps(res.to_json()))
    back = DeqStudyResults.from_json(js)
    assert (
        back == res and back.models[0].defenses[0].gradient_checks["pgd"].probe.correlation == 0.2
    )
    table = summary_table(res)
    assert f"{acc(0.5)} ⚠d" in table and f"{acc(0.3)} ⚠d" not in table
    write_deq_report(res, str(tmp_path))
    report = open(tmp_path / "deq_report.md").read()
    assert "## Gradient paths: check (d)" in report and "**FAIL**" in report and "bpda" in report


@pytest.mark.slow  # ~4 min on the loaded 2-core machine (compilations dominate)
def test_smoke_deq_study_end_to_end(tmp_path):
    """The DEQ study binary at smoke scale: two DEQs, all defences and attacks, JSON and report."""
    config = deq_study_config.get_config("smoke")
    workdir = str(tmp_path / "deq")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.deq_study",
            "--config=experiments/configs/deq_study.py:smoke",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # a hang guard only: the run takes 3-6 min on 2 loaded cores
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [config.models[k].name for k in config.model_order]
    for name in names:
        assert f"| {name} |" in proc.stdout

    js = json.load(open(os.path.join(workdir, "deq_results.json")))
    res = DeqStudyResults.from_json(js)  # types and invariants
    assert res.to_json() == js  # round trip
    assert [m.name for m in res.models] == names and res.ep is None
    report = open(os.path.join(workdir, "deq_report.md")).read()
    assert "| Model | Defence | Clean | PGD (final) |" in report
    assert "AA (interm.): AutoAttack" in report and "reduced budget" in report
    assert "## Gradient paths: check (d)" in report and " ⚠d" in report
    for m in res.models:
        n_states = config.models[m.key].model.f_max_iter
        assert m.num_states == n_states and 1 <= m.early_index <= n_states
        assert [d.name for d in m.defenses] == list(config.defenses)
        for d in m.defenses:
            # the same examples everywhere: every n is num_test
            assert {a.n for a in (d.clean, d.all, *d.attacks.values())} == {config.num_test}
            for k, a in d.attacks.items():
                assert a.accuracy <= d.clean.accuracy, (m.name, d.name, k)
                assert d.all.accuracy <= a.accuracy, (m.name, d.name, k)
                assert a.lo <= a.accuracy <= a.hi
            expected = set(config.final_attacks if d.name == "final" else ())
            expected |= set(config.defense_attacks.get(d.name, ()))
            assert expected <= set(d.attacks), (d.name, sorted(d.attacks))
            assert f"| {m.name} | " in report
        # check (d): the phantom gradient is not the derivative of the Broyden prediction; the
        # early and ensemble states' BPTT gradients are (their own, exact)
        checks = {d.name: d.gradient_checks for d in m.defenses}
        assert checks["final"]["pgd"].passed is False, checks["final"]["pgd"]
        assert checks["early"]["adaptive"].passed is True, checks["early"]["adaptive"]
        assert checks["ensemble"]["adaptive"].passed is True, checks["ensemble"]["adaptive"]
        assert checks["final"]["pgd"].probe.dtype == "float64"
        g = m.defenses[0].grid
        assert g is not None and g.strongest_state in g.states
        assert len(g.cell_accuracy) == len(g.states) * len(g.unrolls) * len(g.lams)
        assert min(g.cell_accuracy) >= g.accuracy.accuracy  # the per-example min is below
        dyn = m.dynamics
        for arr in (dyn.residual_clean, dyn.residual_adv, dyn.entropy_clean, dyn.entropy_adv):
            assert len(arr) == n_states and all(np.isfinite(arr))
        assert dyn.state_attacks[0] == "clean"
        assert len(dyn.state_accuracy) == len(dyn.state_attacks)
        assert all(len(row) == n_states for row in dyn.state_accuracy)
        # Spectral radius of df/dz at z*, one per test image, clean and PGD (issue 13 item 3).
        radii = np.asarray(dyn.spectral_radius_clean + dyn.spectral_radius_adv)
        assert radii.shape == (2 * res.meta["num_test"],) and np.all(np.isfinite(radii))
        assert np.all(radii > 0)
    assert "Spectral radius of df/dz at the solver's z*" in report
    for fname in ["deq_residual.png", "deq_entropy.png"] + [
        f"deq_states_{m.key}.png" for m in res.models
    ]:
        path = os.path.join(workdir, fname)
        assert os.path.getsize(path) > 1000 and f"({fname})" in report
    # The same command again: every row comes from the evaluation cache, same numbers.
    again = subprocess.run(
        proc.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    js2 = json.load(open(os.path.join(workdir, "deq_results.json")))
    assert all(f"evaluate {n} (cached)" in js2["meta"]["timing"] for n in names)
    for a, b in zip(js["models"], js2["models"], strict=True):
        assert list(b["timing"]) == ["loaded from the evaluation cache"]
        assert {k: v for k, v in a.items() if k != "timing"} == {
            k: v for k, v in b.items() if k != "timing"
        }
    # a result that breaks an invariant does not read back
    bad = dataclasses.replace(res.models[0].defenses[0], all=res.models[0].defenses[0].clean)
    if any(a.accuracy < bad.clean.accuracy for a in bad.attacks.values()):
        broken = dataclasses.replace(res.models[0], defenses=(bad,))
        with pytest.raises(ValueError):
            DeqStudyResults.from_json(dataclasses.replace(res, models=(broken,)).to_json())


def test_config_model_keys_select_models_and_typos_raise():
    """`cpu,ep,pgd_at` (make demo) keeps only the PGD-AT DEQ; the EP-CNN is the EP study's."""
    c = deq_study_config.get_config("cpu,ep,pgd_at")
    assert c.model_order == ("pgd_at",)
    # The same training config as the EP study's EP-CNN, so the demo trains it once.
    assert c.ep_model.to_dict() == study_config.get_config("cpu").models.ep_cnn.to_dict()
    assert deq_study_config.get_config("cpu").model_order == ("clean", "pgd_at")
    with pytest.raises(ValueError, match="pgd_att"):
        deq_study_config.get_config("cpu,pgd_att")


# Runs in a fresh process with two host devices (the count is fixed when JAX starts).
_LANE_SCRIPT = """
import jax, jax.numpy as jnp
from flax import nnx
from tqdm import tqdm
from eqrobust import deq_study as S, ops
from eqrobust.configs import deq_study as cfgs
from eqrobust.models.deq import DEQNet, DEQSolver, deq_classifier

devs = jax.devices()
assert len(devs) == 2, devs
m = DEQNet(in_shape=(12, 12, 1), num_classes=3, channels=(4, 8), expansion=2, num_groups=2,
           dropout=0.0, head_channels=(2, 4), final_channels=8, stem_strides=(2,),
           solver=DEQSolver(f_max_iter=4, f_tol=1e-3), rngs=nnx.Rngs(0))
m.eval()
m.head.fc.bias.value = jnp.array([0.0, 0.0, 0.27])  # classes 1 and 2 near a tie: attacks break some
a = cfgs.get_config("smoke").attack
a.queries, a.eps = 20, 0.1
x = jax.random.uniform(jax.random.PRNGKey(1), (8, 12, 12, 1))
y = jnp.argmax(deq_classifier(m).logits_fn(x), -1)  # right on clean x: attacks have work
s = S._Setup(x, y, x, y, a, jax.random.PRNGKey(3))
rows = []
for model in (m, S._on_device(m, devs[1])):
    dev = {ops.device_of(v) for v in jax.tree.leaves(nnx.state(model))}
    bar = tqdm(disable=True)
    er = S._defense_row("entropy", model, dict, s, ("square",), bar, -1, {})
    ens = S._defense_row("ensemble", model, dict, s, ("adaptive",), bar, -1, {})
    rows.append((er, ens, dev))
(serial, ens0, d0), (lane, ens1, d1) = rows
assert d0 == {devs[0]} and d1 == {devs[1]}, (d0, d1)
assert serial == lane, (serial, lane)
assert ens0 == ens1, (ens0, ens1)
assert 0 < serial.attacks["square"].accuracy < serial.clean.accuracy  # a real comparison
assert ens0.attacks["adaptive"].accuracy < ens0.clean.accuracy
assert set(S.LANE_ROWS) <= set(S.DEFENSES)
print("OK")
"""


def test_a_lane_on_the_second_device_gives_the_serial_row():
    """The rows the study's second lane runs (entropy reduction, ensemble state) on a copy of the
    DEQ on host device 1 equal the rows on device 0, attack for attack."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _LANE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_cached_row_stores_reuses_and_recomputes(tmp_path):
    """A row is computed once per key; a changed setting or an unreadable entry recomputes."""
    from eqrobust import deq_study as S
    from eqrobust.evaluation.cache import EvalCache

    row = DynamicsAnalysis(2, (0.5, 0.25), (0.5, 0.3), (1.0, 0.5), (1.0, 0.6), ("clean",),
                           ((0.5, 0.75),), (0.9, 1.1), (1.0, 1.2))  # fmt: skip
    calls = []

    def compute():
        calls.append(1)
        return row

    cache = EvalCache(str(tmp_path), "model-a")
    cached = (cache, dict(num_test=2, attack=dict(eps=8 / 255)))
    assert S._cached_row(cached, "k", DynamicsAnalysis, compute) == (row, False)
    assert S._cached_row(cached, "k", DynamicsAnalysis, compute) == (row, True)
    assert len(calls) == 1
    other = (cache, dict(num_test=2, attack=dict(eps=4 / 255)))
    assert S._cached_row(other, "k", DynamicsAnalysis, compute) == (row, False)
    assert len(calls) == 2
    fname, desc = cache.key("k", cached[1])
    np.savez(os.path.join(str(tmp_path), fname), _key=np.asarray(desc), json=np.asarray("{}"))
    assert S._cached_row(cached, "k", DynamicsAnalysis, compute) == (row, False)
    assert len(calls) == 3
    assert S._cached_row(None, "k", DynamicsAnalysis, compute) == (row, False)
