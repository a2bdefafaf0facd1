"""BP-CNN shapes, input validation, and the Classifier interface."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from eqrobust.models import Classifier, GradientPath, logits_fn
from eqrobust.models.cnn import BPCNN, feature_size, max_pool_2x2


def small(in_shape=(28, 28, 1)):
    return BPCNN(
        in_shape=in_shape, num_classes=10, channels=(4, 8), paddings=(1, 0), rngs=nnx.Rngs(0)
    )


def test_shapes_and_paper_layout():
    assert feature_size((32, 32), (1, 1, 1, 0), 3) == (1, 1)  # paper: 16 -> 8 -> 4 -> 1
    m = small()
    assert m(jnp.full((3, 28, 28, 1), 0.5)).shape == (3, 10)


def test_normalisation_inside_model():
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1))
    a = BPCNN(
        in_shape=(28, 28, 1),
        num_classes=10,
        channels=(4,),
        paddings=(1,),
        mean=0.3,
        std=0.2,
        rngs=nnx.Rngs(0),
    )
    b = BPCNN(in_shape=(28, 28, 1), num_classes=10, channels=(4,), paddings=(1,), rngs=nnx.Rngs(0))
    a.eval(), b.eval()
    # Same weights: the normalising model on x equals the plain model on hand-normalised x.
    assert jnp.allclose(a(x), _plain(b, (x - 0.3) / 0.2), atol=1e-4)


def _plain(m, h):
    # The model's forward pass without its input check (hand-normalised h leaves [0, 1]).
    for conv, norm in zip(m.convs, m.norms):
        h = max_pool_2x2(nnx.relu(norm(conv(h))))
    return m.head(h.reshape(h.shape[0], -1))


def test_boundary_errors():
    m = small()
    with pytest.raises(ValueError, match=r"\[B, 28, 28, 1\]"):
        m(jnp.zeros((2, 32, 32, 3)))
    with pytest.raises(ValueError, match="float"):
        m(jnp.zeros((2, 28, 28, 1), jnp.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m(jnp.full((2, 28, 28, 1), 255.0))
    with pytest.raises(ValueError, match="same length"):
        BPCNN(
            in_shape=(28, 28, 1), num_classes=10, channels=(4, 8), paddings=(1,), rngs=nnx.Rngs(0)
        )


def test_logits_fn_is_pure_eval_mode():
    m = small()
    f = logits_fn(m)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))
    before = jax.tree.map(jnp.copy, nnx.state(m, nnx.BatchStat))
    y1, y2 = jax.jit(f)(x), f(x)
    assert jnp.allclose(y1, y2, atol=1e-5)
    g = jax.grad(lambda x: f(x).sum())(x)
    assert g.shape == x.shape and bool(jnp.any(g != 0))
    after = nnx.state(m, nnx.BatchStat)
    assert all(
        bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
    )
    # Eval mode: an example's logits do not depend on the rest of the batch.
    assert jnp.allclose(f(x[:1]), f(x)[:1], atol=1e-5)


def test_classifier_gradient_path():
    f = lambda x: x
    assert Classifier(f, "ff").gradient_matches_prediction
    ep = lambda g: Classifier(f, "ep", prediction_depth=250, gradient=g)
    assert ep(GradientPath("implicit")).gradient_matches_prediction
    assert not ep(GradientPath("unrolled", 29)).gradient_matches_prediction
    assert ep(GradientPath("unrolled", 250)).gradient_matches_prediction
    assert not ep(GradientPath("phantom", 5)).gradient_matches_prediction
    with pytest.raises(ValueError, match="kind"):
        GradientPath("bptt", 3)
    with pytest.raises(ValueError, match="no depth"):
        GradientPath("implicit", 3)


def test_max_pool_matches_flax_pool_on_odd_sizes():
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 6, 3))
    assert jnp.array_equal(max_pool_2x2(h), nnx.max_pool(h, (2, 2), strides=(2, 2)))


@pytest.mark.parametrize("impl", ["patches", "xla_flip", "auto"])
def test_conv_impls_agree_in_value_and_input_gradient(impl):
    with jax.enable_x64(True):
        x = jax.random.uniform(jax.random.PRNGKey(3), (3, 28, 28, 1), jnp.float64)
        a, b = small(), small()  # same seed: same weights
        a.conv_impl, b.conv_impl = impl, "xla"
        fa, fb = logits_fn(a), logits_fn(b)
        assert jnp.allclose(fa(x), fb(x), atol=1e-10)
        ga = jax.grad(lambda x: jnp.sum(fa(x) ** 2))(x)
        gb = jax.grad(lambda x: jnp.sum(fb(x) ** 2))(x)
        assert jnp.allclose(ga, gb, atol=1e-10)
    with pytest.raises(ValueError, match="conv_impl"):
        BPCNN(in_shape=(28, 28, 1), num_classes=10, conv_impl="fft", rngs=nnx.Rngs(0))


def test_models_of_one_architecture_share_compiled_attacks():
    from eqrobust import attacks
    from eqrobust.attacks import _common
    from eqrobust.attacks.pgd import _pgd

    fa = logits_fn(small())
    fb = logits_fn(
        BPCNN(
            in_shape=(28, 28, 1), num_classes=10, channels=(4, 8), paddings=(1, 0), rngs=nnx.Rngs(7)
        )
    )
    assert fa.func is fb.func and len(jax.tree.leaves(fa)) > 0  # weights are leaves
    x = jax.random.uniform(jax.random.PRNGKey(4), (5, 28, 28, 1))
    y = jnp.arange(5)
    # The weights are traced arguments, not constants of the first model's program.
    assert jnp.allclose(_common.logits(fb, x), fb(x), atol=1e-5)
    assert not jnp.allclose(_common.logits(fa, x), _common.logits(fb, x), atol=1e-3)
    ra = attacks.pgd(fa, x, y, key=jax.random.key(0), eps=0.5, norm="l2", steps=2)
    n = _pgd._cache_size()
    rb = attacks.pgd(fb, x, y, key=jax.random.key(0), eps=0.5, norm="l2", steps=2)
    assert _pgd._cache_size() == n  # no recompilation for the second model
    assert not jnp.allclose(ra.x_adv, rb.x_adv)
