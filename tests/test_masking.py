"""A gallery of masked classifiers built through the public API: each must be flagged by a health
check and lose its headline number; honest models must pass every check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import ep, evaluation
from eqrobust.classifier import Classifier, GradientPath
from eqrobust.energy import EnergyConfig
from eqrobust.evaluation import stages
from eqrobust.report import sections
from eqrobust.results import StudyResults

H = W = 8


def _direction():
    signs = np.where(np.random.default_rng(0).uniform(size=(H, W, 1)) < 0.5, -1.0, 1.0)
    return (signs / 8.0).astype(np.float32)  # ||w||_2 = 1


def _linear(w):
    wj = jnp.asarray(w)

    def logits_fn(x):
        s = jnp.sum((x - 0.5) * wj, axis=(1, 2, 3))
        return jnp.stack([-s, s], axis=-1)

    return logits_fn


def _data(w, n=48):
    rng = np.random.default_rng(1)
    y = np.arange(n) % 2
    d = rng.uniform(0.1, 0.9, size=n)
    noise = rng.uniform(-0.05, 0.05, size=(n, H, W, 1))
    noise -= np.sum(noise * w, axis=(1, 2, 3), keepdims=True) * w
    x = 0.5 + noise + np.where(y == 1, 1.0, -1.0)[:, None, None, None] * d[:, None, None, None] * w
    return x.astype(np.float32), y.astype(np.int32)


def _config():
    c = evaluation.default_config()
    c.attacks = ("pgd_l2", "pgd_linf", "square_linf")
    c.progress = False
    c.batch_size = 48
    c.pgd_l2.grid = (0.3,)
    c.pgd_l2.large = 10.0
    c.pgd_l2.settings.steps = 10
    c.pgd_linf.grid = (0.1,)
    c.pgd_linf.large = None
    c.pgd_linf.settings.steps = 10
    c.square_linf.grid = (0.1,)
    c.square_linf.large = None
    c.square_linf.settings.queries = 200
    c.corruptions.enabled = False
    c.health.convergence_attacks = ()
    c.gallery.num_images = 0
    return c


def _surrogate(value_fn, grad_fn):
    """Forward value of value_fn, gradient of grad_fn."""
    return lambda x: (
        jax.lax.stop_gradient(value_fn(x)) + grad_fn(x) - jax.lax.stop_gradient(grad_fn(x))
    )


def _noisy(fn):
    """A forward that draws fresh noise on every call (host RNG, invisible to JAX's keys)."""
    rng = np.random.default_rng()

    def noise(x):
        return rng.normal(scale=0.3, size=(x.shape[0], 2)).astype(np.float32)

    def logits_fn(x):
        spec = jax.ShapeDtypeStruct((x.shape[0], 2), jnp.float32)
        eps = jax.pure_callback(noise, spec, jax.lax.stop_gradient(x), vmap_method="sequential")
        return fn(x) + jax.lax.stop_gradient(eps)

    return logits_fn


def _tiny_ep():
    cfg = ep.EPConfig(
        energy=EnergyConfig(
            in_shape=(H, W, 1), channels=(4, 8), paddings=(1, 1), num_classes=2, output="softmax"
        ),
        t1=8,
        t2=2,
    )
    # Weights x2: less contractive dynamics, so 2 of the 8 steps give a visibly different gradient.
    return ep.init(jax.random.PRNGKey(3), cfg, scale=2.0), cfg


def _masked():
    w = _direction()
    honest = _linear(w)
    w_orth = np.roll(w, 1, axis=0)
    w_orth -= np.sum(w_orth * w) * w
    quantised = lambda x: honest(jnp.round(x * 4.0) / 4.0)
    params, cfg = _tiny_ep()
    shallow = ep.classifier(params, cfg, gradient=GradientPath("unrolled", 2))
    return {
        "zero gradients": Classifier(quantised, "zero"),
        "foreign gradients": Classifier(_surrogate(honest, _linear(w_orth)), "foreign"),
        "randomised forward": Classifier(_noisy(honest), "noisy"),
        "saturated logits": Classifier(lambda x: 1e4 * honest(x), "saturated"),
        # An EP classifier whose gradient comes from 2 of its 8 steps, declared exact.
        "mislabelled path": dataclasses.replace(
            shallow, gradient=GradientPath("unrolled", cfg.t1), name="mislabelled"
        ),
    }


@pytest.mark.parametrize("kind", list(_masked()))
def test_masked_models_are_flagged_and_get_no_headline(kind):
    clf = _masked()[kind]
    w = _direction()
    x, y = _data(w)
    if kind == "mislabelled path":  # labels the model's own predictions: all points count
        y = np.asarray(jnp.argmax(clf.logits_fn(jnp.asarray(x)), -1), np.int32)
    res = evaluation.evaluate_classifier(clf, x, y, _config())
    failed = {c.id for c in res.health if not c.passed}
    assert failed, [c.message for c in res.health]
    expected = {
        "zero gradients": "d",
        "foreign gradients": "d",
        "randomised forward": "f",
        "saturated logits": "d",  # cross-entropy gradients underflow to exactly zero
        "mislabelled path": "d",
    }[kind]
    assert expected in failed, [c.message for c in res.health]
    head, rows = sections.summary_rows(StudyResults(models=(res,)))
    mean = rows[0][head.index("Mean robustness")]
    assert mean.startswith("⚠"), (head, rows)


def test_honest_models_pass_every_check():
    w = _direction()
    x, y = _data(w)
    params, cfg = _tiny_ep()
    exact = ep.classifier(params, cfg)
    y_ep = np.asarray(jnp.argmax(exact.logits_fn(jnp.asarray(x)), -1), np.int32)
    for clf, labels in ((Classifier(_linear(w), "linear"), y), (exact, y_ep)):
        res = evaluation.evaluate_classifier(clf, x, labels, _config())
        assert all(c.passed for c in res.health), [c.message for c in res.health]
        head, rows = sections.summary_rows(StudyResults(models=(res,)))
        assert not rows[0][head.index("Mean robustness")].startswith("⚠")


def test_robust_above_clean_is_flagged():
    """(h): a robust accuracy significantly above the clean one (success judged on another
    output than the prediction, as the DEQ papers' exact-trained 8/7 model) is flagged; the
    honest result it was edited from is not."""
    from eqrobust.evaluation.health import with_verdicts

    w = _direction()
    x, y = _data(w)
    cfg = _config()
    res = evaluation.evaluate_classifier(Classifier(_linear(w), "linear"), x, y, cfg)
    assert not [c for c in res.health if c.id == "h"]
    # Clean accuracy 0.5 (n=48); every attack at 0.4 except PGD-Linf.
    res = dataclasses.replace(res, clean=dataclasses.replace(res.clean, accuracy=0.5))

    def edited(acc):
        attacks = {
            k: dataclasses.replace(
                v, accuracy=tuple(acc if k == "pgd_linf" else 0.4 for _ in v.values)
            )
            for k, v in res.attacks.items()
        }
        return with_verdicts(dataclasses.replace(res, attacks=attacks), cfg)

    bad = edited(0.8)
    flagged = [c for c in bad.health if c.id == "h" and not c.passed]
    assert [c.attack for c in flagged] == ["pgd_linf"], [c.message for c in bad.health]
    assert "h" in bad.cell_flags("pgd_linf", res.attacks["pgd_linf"].values[0])
    # Within sampling noise of the clean accuracy (one example above): not flagged.
    ok = edited(0.5 + 1.0 / 48)
    assert not [c for c in ok.health if c.id == "h"]


def test_unconverged_exact_deq_is_flagged_and_a_converged_one_is_not():
    """(g) on real DEQs: an exact (implicit-gradient) DEQ stopped after 1 Broyden step predicts
    from a state far from its fixed point and is flagged; a contractive one solved to convergence
    passes; an EP classifier backpropagating through its own 8 unconverged steps passes too."""
    from flax import nnx

    from eqrobust.evaluation.context import gradient_info
    from eqrobust.evaluation.health import check_residual
    from eqrobust.evaluation.probes import residual_probe
    from eqrobust.models.deq import DEQNet, DEQSolver, deq_classifier

    def deq(max_iter, contractive):
        m = DEQNet(
            in_shape=(12, 12, 1),
            num_classes=3,
            channels=(4, 8),
            expansion=2,
            num_groups=2,
            head_channels=(2, 4),
            final_channels=8,
            stem_strides=(2,),
            solver=DEQSolver(f_max_iter=max_iter, f_tol=1e-6, ift=True),
            rngs=nnx.Rngs(0),
        )
        for b in m.cell.blocks:
            if contractive:  # injection-dominated (see test_deq)
                b.gn2.scale[...] = b.gn2.scale[...] * 100.0
            else:  # strongly expanding blocks: far from any fixed point after 1 step
                b.gn1.scale[...] = b.gn1.scale[...] * 10.0
        if contractive:
            m.stem[1].scale[...] = m.stem[1].scale[...] * 100.0
        m.eval()
        return deq_classifier(m)

    x = np.random.default_rng(0).uniform(size=(16, 12, 12, 1)).astype(np.float32)
    verdicts = {}
    for n in (1, 30):
        clf = deq(n, contractive=n > 1)
        r = residual_probe(clf.residual_fn, x)
        verdicts[n] = (r.mean, check_residual(r, 0.75, gradient_info(clf)).passed)
    assert verdicts[1][0] > 0.75 and not verdicts[1][1], verdicts
    assert verdicts[30][0] < 1e-2 and verdicts[30][1], verdicts
    params, cfg = _tiny_ep()
    exact = ep.classifier(params, cfg)
    xe = np.random.default_rng(1).uniform(size=(8, H, W, 1)).astype(np.float32)
    r = residual_probe(exact.residual_fn, xe)
    assert check_residual(r, 0.75, gradient_info(exact)).passed


def test_convergence_check_fails_on_zero_gradients_and_passes_on_an_honest_model():
    """(c) at the cpu study's PGD and convergence settings: the honest linear model converges;
    the quantised one (gradient exactly 0) changes nothing under more steps either, and fails."""
    from eqrobust.configs import study

    cpu = study.get_config("cpu").eval
    w = _direction()
    x, y = _data(w)
    c = _config()
    c.pgd_l2.settings = cpu.pgd_l2.settings
    c.health.more_steps_factor = cpu.health.more_steps_factor
    c.health.more_restarts_factor = cpu.health.more_restarts_factor
    c.health.convergence_tolerance = cpu.health.convergence_tolerance
    c.health.convergence_attacks = c.attacks = ("pgd_l2",)  # one norm: each run compiles
    c.pgd_l2.large = None
    only = [s for s in stages.STAGES if s[0] in ("clean", "attacks", "convergence")]
    verdicts = {}
    for kind, clf in (
        ("honest", Classifier(_linear(w), "linear")),
        ("zero", _masked()["zero gradients"]),
    ):
        res = evaluation.evaluate_classifier(clf, x, y, c, stage_list=only)
        verdicts[kind] = [(ch.passed, ch.message) for ch in res.health if ch.id == "c"]
    assert len(verdicts["honest"]) == 1 and all(p for p, _ in verdicts["honest"]), verdicts
    assert verdicts["zero"] and not any(p for p, _ in verdicts["zero"]), verdicts
    assert all("ZERO loss gradients" in m for _, m in verdicts["zero"]), verdicts
