"""Inference cost of the EP-CNN vs its distilled students, and the spectrum at clean/adversarial s*.

Run (after training the teacher and the students at cpu scale; finished runs are only loaded):

    JAX_PLATFORMS=cpu python benchmarks/zoo_cost.py --teacher_workdir=runs/ep_cnn \
        --students=full_state=runs/distill,last_layer=runs/distill_ll,resnet18=runs/distill_resnet18

Prints one JSON object: per model images/s and f-evaluations per image on the same test subset
(best of `--repeats` passes, batch `--batch`), the speed-up over the teacher's free phase, and the
leading eigenvalues of the teacher's free-phase Jacobian at s*(x) and s*(x_adv) for `--spectrum`
test images (x_adv: PGD-Linf eps 0.1, 20 steps, on the teacher's exact BPTT gradient).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from eqrobust import cost, data, ep, spectrum  # noqa: E402
from eqrobust.attacks.pgd import pgd  # noqa: E402
from eqrobust.configs import distill as distill_config  # noqa: E402
from eqrobust.train import get_trainer  # noqa: E402
from eqrobust.train.distill import load_teacher  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", default="cpu")
    p.add_argument("--teacher_workdir", default="runs/ep_cnn")
    p.add_argument("--students", default="full_state=runs/distill")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--spectrum", type=int, default=64)
    p.add_argument("--k", type=int, default=20)
    a = p.parse_args()
    base = distill_config.get_config(a.scale)
    base.teacher_workdir = a.teacher_workdir
    teacher = load_teacher(base)
    ds = data.load(base.dataset).subset(None, a.num)
    x = data.to_float(ds.x_test)
    clfs = {"EP-CNN": teacher.trained.classifier}
    for item in a.students.split(","):
        variant, workdir = item.split("=")
        c = distill_config.get_config(f"{a.scale},{variant}")
        c.teacher_workdir = a.teacher_workdir
        clfs[c.name] = get_trainer("distill")(c, workdir).classifier
    out: dict = {"num_images": a.num, "batch": a.batch}
    preds = {}
    for name, clf in clfs.items():
        out[name] = cost.inference_cost(clf, x, batch_size=a.batch, repeats=a.repeats)
        preds[name] = np.concatenate(
            [
                np.argmax(jax.jit(clf.logits_fn)(x[i : i + a.batch]), -1)
                for i in range(0, a.num, a.batch)
            ]
        )
        out[name]["accuracy"] = float(np.mean(preds[name] == ds.y_test))
        out[name]["agreement_with_teacher"] = float(np.mean(preds[name] == preds["EP-CNN"]))
        out[name]["speedup_vs_teacher"] = out[name]["images_per_s"] / out["EP-CNN"]["images_per_s"]
    n = a.spectrum
    xs, ys = x[:n], jnp.asarray(ds.y_test[:n])
    adv = pgd(clfs["EP-CNN"].logits_fn, xs, ys, key=jax.random.PRNGKey(0), eps=0.1, steps=20)
    res = spectrum.spectrum_clean_vs_adversarial(
        spectrum.ep_map(teacher.params, teacher.cfg),
        lambda xb: ep.free_phase(teacher.params, xb, teacher.cfg).z,
        xs,
        adv.x_adv,
        k=a.k,
        top=5,
        batch_size=32,
    )
    out["spectrum"] = dict(res.summary, k=a.k, num=n, pgd_success=float(jnp.mean(adv.success)))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
