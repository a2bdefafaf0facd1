"""Health check (d) on trained models: does each gradient path match finite differences of the
prediction? Honest paths must pass, surrogate ones fail (calibrates the thresholds).

    python -m experiments.train --config=experiments/configs/ep_cnn.py:cpu --workdir=runs/ep_cnn
    python -m experiments.train --config=experiments/configs/bp_cnn.py:cpu --workdir=runs/bp_cnn \
        --config.num_epochs=2 --config.optimizer.cosine_epochs=2
    python benchmarks/probe_calibration.py --ep_workdir=runs/ep_cnn --bp_workdir=runs/bp_cnn
"""

import time

import jax
from absl import app, flags

from eqrobust import data, ep
from eqrobust.classifier import GradientPath
from eqrobust.configs import bp_cnn, ep_cnn
from eqrobust.evaluation import default_config
from eqrobust.evaluation.health import check_gradient_probe
from eqrobust.evaluation.probes import gradient_probe
from eqrobust.train import ep as ep_train
from eqrobust.train import get_trainer
from eqrobust.train.supervised import load_data

_EP = flags.DEFINE_string("ep_workdir", "runs/ep_cnn", "A finished ep_cnn.py:cpu run.")
_BP = flags.DEFINE_string("bp_workdir", "runs/bp_cnn", "A finished bp_cnn.py:cpu run (2 epochs).")
_N = flags.DEFINE_integer("images", 8, "Test images probed.")


def main(argv):
    del argv
    h = default_config().health
    cfg = ep_cnn.get_config("cpu")
    trained = get_trainer("ep")(cfg, _EP.value)
    ds = load_data(cfg)
    epc = ep_train.build_ep_config(cfg, ds)
    x, y = data.to_float(ds.x_test[: _N.value]), ds.y_test[: _N.value]
    rows = []
    paths = [None, GradientPath("unrolled", 5), GradientPath("unrolled", 10)]
    for path in paths + [GradientPath("implicit")]:
        clf = ep.classifier(trained.state["params"], epc, gradient=path)
        rows.append((f"EP-CNN T={epc.t1}, {clf.gradient}", clf.logits_fn))
    bcfg = bp_cnn.get_config("cpu")
    bcfg.num_epochs = bcfg.optimizer.cosine_epochs = 2
    rows.append(("BP-CNN", get_trainer("supervised")(bcfg, _BP.value).classifier.logits_fn))
    print("| model, gradient | correlation | median rel. error | zero grad | (d) | s |")
    print("|---|---|---|---|---|---|")
    for name, fn in rows:
        t0 = time.perf_counter()
        p = gradient_probe(fn, x, y, key=jax.random.key(0), step=h.gradient_step)
        ok = check_gradient_probe(p, h).passed
        print(
            f"| {name} | {p.correlation:.3f} | {p.relative_error:.3f} | "
            f"{p.zero_gradient_fraction:.0%} | {'pass' if ok else 'FAIL'} | "
            f"{time.perf_counter() - t0:.1f} |"
        )


if __name__ == "__main__":
    app.run(main)
