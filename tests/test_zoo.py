"""Model zoo: distillation loss and training, AutoAugment, ViT / ResNet-18, spectrum, cost, and
the study with the zoo rows."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from eqrobust import autoaugment as aa
from eqrobust import cost, energy, ep, spectrum
from eqrobust.configs import distill as distill_config
from eqrobust.configs import ep_cnn, resnet18, vit
from eqrobust.configs import study as study_config
from eqrobust.models import Classifier, logits_fn
from eqrobust.models.ep_student import EPStudent
from eqrobust.models.resnet import ResNet18
from eqrobust.models.vit import ViT
from eqrobust.results import StudyResults
from eqrobust.train import distill, get_trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------- distillation loss


def _np_conv(s, w, b, p):
    # s [H, W, Cin], w [k, k, Cin, Cout]: stride-1 cross-correlation with zero padding p.
    k = w.shape[0]
    sp = np.pad(s, ((p, p), (p, p), (0, 0)))
    ho, wo = sp.shape[0] - k + 1, sp.shape[1] - k + 1
    out = np.zeros((ho, wo, w.shape[-1]))
    for i in range(ho):
        for j in range(wo):
            out[i, j] = np.einsum("abc,abcd->d", sp[i : i + k, j : j + k], w) + b
    return out


def _np_pool(u):
    h, w = u.shape[0] // 2, u.shape[1] // 2
    return u[: 2 * h, : 2 * w].reshape(h, 2, w, 2, -1).max(axis=(1, 3))


def _np_student(ws, bs, x, mean, std):
    # Hand-written Distilled BP-CNN forward for one image: my_hard_sig(pool(conv)) per layer.
    h, states = (x - mean) / std, []
    for w, b in zip(ws[:-1], bs[:-1]):
        h = np.clip(_np_pool(_np_conv(h, w, b, 1)) / 2, 0, 1)
        states.append(h)
    return states, h.reshape(-1) @ ws[-1] + bs[-1]


def test_full_state_loss_equals_hand_computation():
    with jax.enable_x64(True):
        ecfg = energy.EnergyConfig(in_shape=(6, 6, 1), channels=(2, 3), paddings=(1, 1))
        cfg = ep.EPConfig(energy=ecfg, t1=30)
        t_params = ep.init(jax.random.PRNGKey(0), cfg, dtype=jnp.float64, scale=2.0)
        x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6, 6, 1), jnp.float64)
        y = jnp.array([0, 3, 7, 9])
        t_states, t_logits = distill.teacher_targets(t_params, cfg, x)
        student = EPStudent(in_shape=(6, 6, 1), num_classes=10, channels=(2, 3), rngs=nnx.Rngs(3))
        graphdef, state = nnx.split(student)
        student = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state))
        s_states, s_logits = student.states(x)
        loss, parts = distill.distill_loss(s_states, s_logits, t_states, t_logits, y)
        ll, _ = distill.distill_loss(s_states, s_logits, t_states, t_logits, y, loss="last_layer")
        assert s_logits.dtype == jnp.float64
        ws = [np.asarray(w.get_value()) for w in student.ws]
        bs = [np.asarray(b.get_value()) for b in student.bs]
        mse = np.zeros(2)
        ce = 0.0
        for i in range(4):
            st, lg = _np_student(ws, bs, np.asarray(x[i]), 0.0, 1.0)
            for layer in range(2):
                mse[layer] += np.mean((np.asarray(t_states[layer][i]) - st[layer]) ** 2) / 4
            t = np.exp(t_logits[i] - np.max(t_logits[i]))
            t = t / t.sum()
            logp = lg - np.max(lg) - np.log(np.sum(np.exp(lg - np.max(lg))))
            ce += -np.sum(t * logp) / 4
            np.testing.assert_allclose(s_logits[i], lg, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(parts["mse"], mse, rtol=1e-10)
        np.testing.assert_allclose(loss, mse.sum() + ce, rtol=1e-10)
        np.testing.assert_allclose(ll, ce, rtol=1e-10)
        assert mse.min() > 1e-4  # a nontrivial check: the states differ


@pytest.fixture(scope="module")
def smoke_teacher(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ep_teacher"))
    get_trainer("ep")(ep_cnn.get_config("smoke"), workdir)
    return workdir


def test_smoke_student_approaches_teacher(smoke_teacher):
    c = distill_config.get_config("smoke")
    c.teacher_workdir = smoke_teacher
    hist = get_trainer("distill")(c, None).history
    first, last, final = hist[0], hist[-2], hist[-1]
    for layer in (0, 1):
        assert last[f"train_mse_l{layer}"] < 0.8 * first[f"train_mse_l{layer}"]
    assert last["train_agreement"] > first["train_agreement"] + 0.3
    assert final["test_agreement"] > 0.75
    assert set(final) >= {"test_state_mse_l0", "test_state_mse_l1", "teacher_test_accuracy"}


def test_full_state_needs_states(smoke_teacher):
    c = distill_config.get_config("smoke,resnet18")
    c.teacher_workdir = smoke_teacher
    c.distill.loss = "full_state"
    with pytest.raises(ValueError, match="states"):
        get_trainer("distill")(c, None)


def test_study_entries():
    teacher = ep_cnn.get_config("cpu")
    rows = distill_config.study_entries(teacher, "runs/study/ep_cnn", "runs/study")
    assert list(rows) == [
        "Distilled BP-CNN",
        "Distilled BP-CNN(ll)",
        "ResNet-18 student",
        "ResNet-18",
        "ViT",
    ]
    assert rows["Distilled BP-CNN"][0].distill.loss == "full_state"
    assert rows["Distilled BP-CNN(ll)"][0].distill.loss == "last_layer"
    assert rows["ResNet-18 student"][0].model.name == "resnet18"
    assert rows["ViT"][0].trainer == "supervised" and rows["ViT"][1] == "runs/study/vit"
    assert all(c.dataset == teacher.dataset for c, _ in rows.values())


# --------------------------------------------------------------------------- AutoAugment


@pytest.mark.parametrize("channels", [1, 3])
def test_autoaugment_dtype_shape_range_determinism(channels):
    x = jax.random.randint(jax.random.PRNGKey(0), (16, 12, 12, channels), 0, 256).astype(jnp.uint8)
    fn = jax.jit(aa.autoaugment)
    a, b = fn(jax.random.PRNGKey(5), x), fn(jax.random.PRNGKey(5), x)
    c = fn(jax.random.PRNGKey(6), x)
    assert a.dtype == jnp.uint8 and a.shape == x.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, x)
    img = x[0].astype(jnp.float32)
    for i, name in enumerate(aa.OPS):
        v = 1.5 if name in aa.ENHANCE else float(aa.RANGES[name][6])
        out = jax.jit(aa._apply_op)(jnp.asarray(i), jnp.asarray(v, jnp.float32), img)
        assert out.shape == img.shape, name
        assert float(out.min()) >= 0 and float(out.max()) <= 255, name
        if name == "color" and channels == 1:  # saturation is the identity on one channel
            assert np.array_equal(out, img)
        if name == "invert":
            assert np.array_equal(255 - out, img)
    with pytest.raises(ValueError, match="uint8"):
        aa.autoaugment(jax.random.PRNGKey(0), x.astype(jnp.float32))


# --------------------------------------------------------------------------- ViT, ResNet-18


def test_vit_resnet_shapes():
    x = jnp.full((2, 28, 28, 1), 0.5)
    v = ViT(in_shape=(28, 28, 1), num_classes=10, hidden=24, mlp=24, depth=2, heads=4,
            rngs=nnx.Rngs(0))  # fmt: skip
    assert v.patches(x).shape == (2, 49, 16)
    r = ResNet18(in_shape=(28, 28, 1), num_classes=10, width=4, rngs=nnx.Rngs(0))
    for m in (v, r):  # traced only (eval mode), no compile
        assert jax.eval_shape(logits_fn(m), x).shape == (2, 10)
    assert len(r.blocks) == 8 and r.blocks[2].project  # 2-2-2-2, stride-2 projection


@pytest.mark.parametrize("module", [resnet18, vit])
def test_supervised_smoke_run(module):
    c = module.get_config("smoke")
    trained = get_trainer("supervised")(c, None)
    assert len(trained.history) == c.num_epochs
    assert all(np.isfinite(r["train_loss"]) for r in trained.history)
    x = jnp.full((3, 28, 28, 1), 0.5)
    assert trained.classifier.logits_fn(x).shape == (3, 10)


# --------------------------------------------------------------------------- spectrum, cost


def _dense_eigs(f, z, x):
    g = spectrum._single(f)
    out = []
    for i in range(x.shape[0]):
        zf, un = ravel_pytree(jax.tree.map(lambda a: a[i], z))
        jac = jax.jacfwd(lambda v: ravel_pytree(g(un(v), x[i]))[0])(zf)
        ev = np.linalg.eigvals(np.asarray(jac))
        out.append(ev[np.argsort(-np.abs(ev))])
    return np.stack(out)


def test_spectrum_matches_dense_jacobian():
    with jax.enable_x64(True):
        ecfg = energy.EnergyConfig(in_shape=(8, 8, 1), channels=(3, 4), paddings=(1, 1))
        cfg = ep.EPConfig(energy=ecfg, t1=200)
        params = ep.init(jax.random.PRNGKey(1), cfg, dtype=jnp.float64, scale=3.0)
        x = jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 1), jnp.float64)
        z = ep.free_phase(params, x, cfg).z
        f = spectrum.ep_map(params, cfg)
        dense = _dense_eigs(f, z, x)
        n = dense.shape[1]
        assert np.abs(dense[:, 0]).min() > 0.05
        for mode in ("jvp", "vjp"):
            ours = spectrum.leading_eigenvalues(f, z, x, k=n, top=4, mode=mode)
            np.testing.assert_allclose(np.abs(ours), np.abs(dense[:, :4]), rtol=1e-6, atol=1e-9)
        # A generic non-symmetric map (complex eigenvalues): z <- tanh(A z + x).
        a = jax.random.normal(jax.random.PRNGKey(3), (12, 12), jnp.float64) * 0.4
        fg = lambda z, x: jnp.tanh(z @ a.T + x)  # noqa: E731
        xg = jax.random.normal(jax.random.PRNGKey(4), (2, 12), jnp.float64)
        zg = jnp.zeros_like(xg)
        for _ in range(300):
            zg = fg(zg, xg)
        dense = _dense_eigs(fg, zg, xg)
        ours = spectrum.leading_eigenvalues(fg, zg, xg, k=12, top=12)
        assert np.abs(dense.imag).max() > 1e-3
        for i in range(2):  # same multiset of eigenvalues
            d = np.abs(ours[i][:, None] - dense[i][None, :])
            assert d.min(axis=1).max() < 1e-8


def test_spectrum_clean_vs_adversarial_and_cost():
    ecfg = energy.EnergyConfig(in_shape=(8, 8, 1), channels=(3, 4), paddings=(1, 1))
    cfg = ep.EPConfig(energy=ecfg, t1=30)
    params = ep.init(jax.random.PRNGKey(1), cfg, scale=3.0)
    x = jax.random.uniform(jax.random.PRNGKey(2), (6, 8, 8, 1))
    x_adv = jnp.clip(x + 0.1 * jnp.sign(jax.random.normal(jax.random.PRNGKey(3), x.shape)), 0, 1)
    res = spectrum.spectrum_clean_vs_adversarial(
        spectrum.ep_map(params, cfg),
        lambda xb: ep.free_phase(params, xb, cfg).z,
        x,
        x_adv,
        k=8,
        top=3,
        batch_size=4,
    )
    assert res.clean.shape == (6, 3) and res.adversarial.shape == (6, 3)
    assert 0 <= res.summary["clean_radius_median"] <= res.summary["clean_radius_q90"]
    ep_clf = ep.classifier(params, cfg)
    student = EPStudent(in_shape=(8, 8, 1), num_classes=10, channels=(3, 4), rngs=nnx.Rngs(0))
    ff = Classifier(logits_fn=logits_fn(student), name="student")
    c_ep = cost.inference_cost(ep_clf, x, batch_size=3, repeats=1)
    c_ff = cost.inference_cost(ff, x, batch_size=3, repeats=1)
    assert c_ep["f_evals_per_image"] == 30 and c_ff["f_evals_per_image"] == 1
    assert c_ep["images_per_s"] > 0 and c_ff["images_per_s"] > 0


# --------------------------------------------------------------------------- study with the zoo

ZOO_ROWS = [
    "EP-CNN",
    "BP-CNN",
    "Adv-CNN(0.5)",
    "Adv-CNN(1.0)",
    "Distilled BP-CNN",
    "Distilled BP-CNN(ll)",
    "ResNet-18 student",
    "ResNet-18",
    "ViT",
]


def test_study_config_zoo_option():
    plain, zoo = study_config.get_config("cpu"), study_config.get_config("cpu,zoo")
    assert plain.to_dict() == study_config.get_config("cpu").to_dict()
    assert "inference_cost" not in plain and len(plain.model_order) == 4
    assert [zoo.models[k].name for k in zoo.model_order] == ZOO_ROWS
    for k in plain.model_order:  # the four rows and the evaluation are unchanged
        assert zoo.models[k].to_dict() == plain.models[k].to_dict()
    assert zoo.eval.to_dict() == plain.eval.to_dict()
    assert zoo.eval_overrides.to_dict() == plain.eval_overrides.to_dict()
    students = [k for k in zoo.model_order if zoo.models[k].get("study_teacher")]
    assert students == ["distill_full_state", "distill_last_layer", "distill_resnet18"]
    assert {zoo.models[k].dataset for k in zoo.model_order} == {"fashion_mnist"}
    with pytest.raises(ValueError, match="zoo"):
        study_config.get_config("cpu,zo")


@pytest.mark.slow  # the whole smoke study with nine models (3 new architectures to compile)
def test_smoke_study_with_zoo(tmp_path):
    """`study.py:smoke,zoo` end to end: nine rows, each attacked, corrupted and health-checked;
    the students distil the study's own EP-CNN run; the report compares inference cost."""
    workdir = str(tmp_path / "study")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.study",
            "--config=experiments/configs/study.py:smoke,zoo",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = StudyResults.from_json(json.load(open(os.path.join(workdir, "results.json"))))
    assert [m.name for m in res.models] == ZOO_ROWS
    base = res.models[1]  # BP-CNN: the full smoke evaluation
    for m in res.models[4:]:
        assert m.clean.n == base.clean.n == 32 and m.residual is None
        assert set(m.attacks) == set(base.attacks)
        assert all(m.attacks[a].n == base.attacks[a].n for a in m.attacks)
        assert {c.id for c in m.health} >= {"a", "b", "c", "d", "e", "f"}
        assert m.corruptions.n == base.corruptions.n
    # The students' teacher is the study's EP-CNN run.
    teacher_dir = os.path.join(workdir, "ep_cnn")
    for key in ("distill_full_state", "distill_last_layer", "distill_resnet18"):
        stored = json.load(open(os.path.join(workdir, key, "config.json")))
        assert stored["teacher_workdir"] == teacher_dir
    ic = res.meta["inference_cost"]
    assert ic["teacher"] == "EP-CNN" and ic["num_examples"] == 32
    rows = {r["name"]: r for r in ic["rows"]}
    assert list(rows) == ["EP-CNN", "Distilled BP-CNN", "Distilled BP-CNN(ll)", "ResNet-18 student"]
    assert rows["EP-CNN"]["f_evals_per_image"] == res.models[0].gradient.prediction_depth == 6
    assert all(rows[n]["f_evals_per_image"] == 1 for n in list(rows)[1:])
    assert rows["EP-CNN"]["agreement"] == 1.0 and all(r["images_per_s"] > 0 for r in rows.values())
    assert rows["EP-CNN"]["agreement_test"] == 1.0 and ic["num_test"] > ic["num_examples"]
    assert all(0.0 <= r["agreement_test"] <= 1.0 for r in rows.values())
    md = open(os.path.join(workdir, "report.md")).read()
    assert "## Inference cost" in md and "| Distilled BP-CNN | " in md
    for name in ZOO_ROWS:
        assert f"### {name} (seed 0)" in md  # health checks of every row
        assert f"| {name} |" in proc.stdout  # the summary table
