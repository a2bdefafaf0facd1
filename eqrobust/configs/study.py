"""The robustness study: EP-CNN, BP-CNN, Adv-CNN(0.5), Adv-CNN(1.0) trained (or loaded), attacked,
corrupted, health-checked and reported.

Run:
    python -m experiments.study --config=experiments/configs/study.py:cpu --workdir=runs/demo
    (`make demo`; <= 30 minutes on 2 cores including training; report in runs/demo/report.md)
    python -m experiments.study --config=experiments/configs/study.py:smoke,zoo --workdir=runs/zoo

Argument: `<scale>[,zoo]`.
Option `zoo` (issue 13) adds five rows after the four above: Distilled BP-CNN, Distilled
    BP-CNN(ll) and the ResNet-18 student (eqrobust/configs/distill.py; their teacher is the
    study's own EP-CNN run, workdir/ep_cnn, trained or loaded first), ResNet-18 and ViT
    (resnet18.py, vit.py; trained from labels), all on the EP-CNN's data. Every row gets the same
    evaluation config and examples. The report adds "Inference cost": images/s and f-evaluations
    per image of the EP-CNN and its students on the clean-accuracy examples (eqrobust/cost.py).
    Measured at smoke scale only (BUILD_NOTES.md, issue 13); the cpu-scale zoo (each model's cpu
    config) is not measured and does not fit the demo's 30 minutes.

Scales:
    smoke  tiny models on synthetic 28x28 data, 64 test examples, few attack steps; < 2 minutes
           for the whole study (tests/test_study.py).
    cpu    Fashion-MNIST, the models' cpu configs; clean and corruption accuracy on explicit
           subsets, every attack on the same 50 test images (PGD 50 steps, Square with 500
           queries, strong C&W, standard AutoAttack at its full budget, Linf at 8/255 and L2
           at 1.0), corruptions on 250 (the papers' C&W protocol: paper scale), the same
           examples and settings for every model; every subset is stated in the report.
    paper  the models' paper configs (CIFAR-10) and the papers' evaluation grid on the full test
           split (Square: 600 images as in the paper); GPU.

Evaluation cache (`eval_cache`, default True): each model's attack cells and corruption results
go to <model run>/eval_cache/ as they are computed and are reused, so a rerun skips finished
work, an interrupted run continues, and a changed setting reruns only what it enters. Delete
eval_cache/ or pass --config.eval_cache=False to recompute everything.
"""

import ml_collections

from eqrobust import evaluation
from eqrobust.configs import adv_cnn, bp_cnn, distill, ep_cnn

SCALES = ("smoke", "cpu", "paper")


def _spectrum(scale: str) -> ml_collections.ConfigDict:
    """Spectrum of the linearised free phase at s* (ep-distillation eqs. 3-7): the leading
    eigenvalue modulus per example (Arnoldi, `krylov` JVPs) at the clean and the PGD-Linf
    fixed points of the first `num_examples` clean-accuracy examples (issue 13 item 3)."""
    if scale == "smoke":
        return ml_collections.ConfigDict(dict(num_examples=8, krylov=6, eps=8 / 255, steps=3))
    return ml_collections.ConfigDict(dict(num_examples=64, krylov=20, eps=8 / 255, steps=20))


OPTIONS = ("zoo",)


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    """The study config for `scale` = "<scale>[,zoo]" (e.g. "cpu", "smoke,zoo")."""
    scale, option = _parse(scale)
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.title = f"Robustness study ({scale} scale)"
    c.seeds, c.eval_cache = (0,), True  # eval_cache: see "Evaluation cache" above

    ep = ep_cnn.get_config(scale)
    ep.name = "EP-CNN"
    bp = bp_cnn.get_config(scale)
    bp.name = "BP-CNN"
    adv05 = adv_cnn.get_config(scale)
    adv05.adv.eps, adv05.name = 0.5, "Adv-CNN(0.5)"
    adv10 = adv_cnn.get_config(scale)
    adv10.adv.eps, adv10.name = 1.0, "Adv-CNN(1.0)"
    c.models = ml_collections.ConfigDict(
        dict(ep_cnn=ep, bp_cnn=bp, adv_cnn_05=adv05, adv_cnn_10=adv10)
    )
    c.model_order = ("ep_cnn", "bp_cnn", "adv_cnn_05", "adv_cnn_10")

    # EP analyses: attack gradients from t BPTT steps (t > T dropped; t = T is the exact one)
    # and from the implicit gradient; prediction always at the model's T.
    c.ep_analysis = ml_collections.ConfigDict()
    c.ep_analysis.bptt_depths = (10, 20, 30, 40, 50, 60, 70, 250)
    c.ep_analysis.implicit = True
    c.ep_analysis.spectrum = _spectrum(scale)

    e = evaluation.default_config()
    c.eval = e
    # Per-model replacements of eval entries (nested like c.eval), e.g. fewer attacks for EP.
    c.eval_overrides = ml_collections.ConfigDict()
    if scale == "smoke":
        # Plumbing only: a few training steps, few examples. Each distinct attack program costs
        # one compilation, shared by the three CNNs (one architecture); the costly attacks
        # (AutoAttack, C&W) are skipped for the EP-CNN, whose programs are all its own.
        for m in c.models.values():
            m.num_steps = 6
            m.log_every_steps = 2
        ep.model.t1, ep.model.t2 = 6, 3  # prediction depth 6: cheap attacks through the dynamics
        c.ep_analysis.bptt_depths = (3,)
        e.batch_size = 32
        e.num_examples = 32
        for a in (e.pgd_l2, e.pgd_linf):
            a.settings.steps = 3
        e.pgd_l2.grid, e.pgd_linf.grid = (0.31, 1.0), (3 / 255, 8 / 255)
        e.square_linf.grid = (3 / 255, 8 / 255)
        e.autoattack_linf.grid = (8 / 255,)
        e.autoattack_linf.large = None
        e.autoattack_linf.num_examples = 8
        e.autoattack_linf.settings.update(dict(steps=10, queries=100, targets=3))
        e.cw_l2.grid = (0.01,)
        e.cw_l2.settings.steps = 3
        e.cw_l2.settings.binary_search_steps = 2
        e.cw_l2.num_examples = 8
        # The strong C&W differs only in settings (tests/test_attacks.py): not repeated here.
        e.attacks = tuple(a for a in e.attacks if a != "cw_l2_strong")
        e.square_linf.settings.queries = 30
        e.corruptions.names = ("gaussian_noise", "contrast")
        e.corruptions.severities = (1, 5)
        e.dynamics.grid = (1.0,)
        e.dynamics.num_examples = 16
        e.health.more_steps_factor = 2
        e.health.more_restarts_factor = 1
        e.health.convergence_attacks = ("pgd_l2",)
        e.gallery.num_images = 3
        cheap = ml_collections.ConfigDict(dict(attacks=("pgd_l2", "pgd_linf", "square_linf")))
        c.eval_overrides = ml_collections.ConfigDict(dict(ep_cnn=cheap))
    elif scale == "cpu":
        _cpu_scale(c, ep, bp, (adv05, adv10))
    elif scale == "paper":
        c.seeds = (0, 1, 2, 3, 4)
        e.square_linf.num_examples = 600
        # L2 attacks get their black-box counterpart (check (b)); not at cpu scale, where the
        # demo's time budget goes to the DEQ side.
        e.attacks = (*e.attacks, "square_l2")
        e.square_l2.num_examples = 600
        e.gallery.eps = 3.0
    return add_zoo(c) if option == "zoo" else c


def _cpu_scale(
    c: ml_collections.ConfigDict,
    ep: ml_collections.ConfigDict,
    bp: ml_collections.ConfigDict,
    advs: tuple[ml_collections.ConfigDict, ...],
) -> None:
    """The cpu scale's subsets, budgets and training budgets (c and the model configs in place)."""
    e = c.eval
    # Budget (make demo, 2 idle cores, <= 30 min incl. training): explicit subsets, grids
    # and Square budgets, all stated in the report. Every model runs every attack on the SAME
    # examples with the same settings (no per-model overrides): attacks through the EP free
    # phase cost ~T x a CNN attack, so the subsets are those the EP-CNN can afford, not the
    # larger ones the CNNs could (a table row never mixes n). The three CNNs share one architecture, so they share every compiled
    # attack (the weights are traced arguments).
    c.ep_analysis.bptt_depths = (5, 10)
    e.batch_size = 250
    e.num_examples = 1000  # clean accuracy and corruption base set
    # Every attack on the same 50 examples (PGD: 200 until the fifth session, 100 until the
    # eleventh: room for the DEQ side, then for the full-budget AutoAttack below).
    e.pgd_l2.num_examples = e.pgd_linf.num_examples = 50
    # PGD that converges (check (c): 5x the steps changes <= 1 of 100 examples on the
    # trained BP-CNN and EP-CNN): 50 steps of eps/4 instead of 20 of eps/8, about the cost
    # (larger steps break examples sooner, and broken ones stop); BUILD_NOTES.md, "Strong C&W
    # and converged PGD".
    for a in (e.pgd_l2, e.pgd_linf):
        a.settings.update(dict(steps=50, step_fraction=0.25))
    # Standard AutoAttack at its full budget (100 APGD/FAB iterations, 9 targets, Square 5000
    # queries), Linf and L2, at the largest radius of each grid (8/255; 1.0, the Adv-CNN(1.0)'s
    # training radius) on 50 examples; the other radii have PGD, Square and C&W. L2 Square at
    # that radius is the black-box counterpart of the L2 attacks (check (b)).
    e.attacks = (*e.attacks, "autoattack_l2", "square_l2")
    e.autoattack_linf.grid, e.autoattack_l2.grid = (8 / 255,), (1.0,)
    for a in (e.autoattack_linf, e.autoattack_l2, e.square_linf, e.square_l2):
        a.num_examples = 50
    e.square_linf.settings.queries = e.square_l2.settings.queries = 500
    e.square_l2.grid = (1.0,)
    # The papers' C&W (10 Adam steps per constant) lands on one point for every initial
    # constant (BUILD_NOTES): paper scale only. The strong C&W (fixed c, 100 Adam steps, lr
    # 0.1) falls with c, ~0 at c = 100 (check (a)).
    e.attacks = tuple(a for a in e.attacks if a != "cw_l2")
    e.cw_l2_strong.num_examples = 50
    e.cw_l2_strong.grid = (0.1, 1.0)
    e.corruptions.num_examples = 250  # 500 until the eleventh session
    e.dynamics.num_examples = 50  # EP-CNN only (its free-phase analyses)
    e.dynamics.grid = (0.31, 1.0)
    e.health.num_examples = 50
    # (c) allows one example of the 50 to change under 5x the steps (the default 1 point is
    # half an example here); zero-gradient models still fail it (convergence_max_zero_gradient).
    e.health.convergence_tolerance = 0.02
    e.health.more_restarts_factor = 1
    e.gallery.num_images = 6
    # Training budget: BP-CNN 2 epochs (its standalone cpu config trains 6; 2 reach about the
    # EP-CNN's clean accuracy); adversarial training costs (1 + steps) x a clean step: 3-step
    # PGD, 1 epoch.
    bp.num_epochs = bp.optimizer.cosine_epochs = 2
    ep.eval_every_epochs = ep.num_epochs  # the study measures clean accuracy itself
    for m in advs:
        m.num_epochs = 1
        m.optimizer.cosine_epochs = 1


def _parse(arg: str) -> tuple[str, str]:
    """(scale, option) of "<scale>[,zoo]"."""
    scale, _, option = arg.partition(",")
    if scale not in SCALES or option not in ("", *OPTIONS):
        raise ValueError(f"unknown scale {arg!r}; expected '<scale>[,zoo]' with scale in {SCALES}")
    return scale, option


def add_zoo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """c with the model-zoo rows (`distill.study_entries`) after its models, and the
    inference-cost comparison of the EP-CNN with its students (c is changed in place).

    The distillation configs name their teacher by study key (`study_teacher = "ep_cnn"`); the
    study sets `teacher` and `teacher_workdir` to that model's config and run directory when it
    trains them (eqrobust/study.py), so the students distil the study's own EP-CNN.
    """
    if "ep_cnn" not in c.models:
        raise ValueError("the zoo rows distil the study's EP-CNN: config.models.ep_cnn is missing")
    keys = []
    for cfg, wd in distill.study_entries(c.models.ep_cnn, None, ".").values():
        key = wd.rsplit("/", 1)[-1]  # distill_full_state, ..., resnet18, vit
        if cfg.trainer == "distill":
            cfg.study_teacher = "ep_cnn"
        if c.scale == "smoke":  # plumbing only, like the four models above
            cfg.num_steps, cfg.log_every_steps = 6, 2
        c.models[key] = cfg
        keys.append(key)
    c.model_order = (*c.model_order, *keys)
    c.title += " with the model zoo"
    c.inference_cost = ml_collections.ConfigDict(
        dict(teacher="ep_cnn", batch_size=c.eval.batch_size, repeats=3)
    )
    return c
