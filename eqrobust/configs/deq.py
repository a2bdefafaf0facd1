"""Deep equilibrium models (MDEQ): clean, PGD-AT or TRADES training; phantom or exact gradient.

Run:
    python -m experiments.train --config=experiments/configs/deq.py:cpu --workdir=runs/deq
    python -m experiments.train --config=experiments/configs/deq.py:cpu,pgd_at --workdir=runs/deq_at

The argument is `scale[,variant...]`: scale is smoke | cpu | paper | paper_xl, variants are
    clean | pgd_at | trades      objective (default clean)
    rand | norand                random-intermediate-state loss (paper 5, Sec. 3.3; default off)
    jac | nojac                  Jacobian regularisation (default on, as the reference)
    phantom | exact              gradient for training and attacks (default phantom)
e.g. `deq.py:paper,trades,rand,jac` (the 2023 paper's best recipe). Every field can also be set
with --config.field=value.

Scales:
    smoke     synthetic 28x28 data, 2 tiny branches; seconds (tests).
    cpu       Fashion-MNIST (20000-image subset: 16000 train + 4000 validation), 2 branches (16/32
              channels at 14x14/7x7, expansion 2, head 16/32, final 256), 8 Broyden steps + f + 5 damped steps; Adam 3e-3
              cosine, 3 epochs, 100 pretraining steps; PGD-AT/TRADES with 3 steps of 0.04 in the
              0.1 Linf ball; minutes on 2 cores (times in BUILD_NOTES).
    paper     CIFAR-10, DEQ-Large(reg) of locuslab/deq `cls_mdeq_LARGE_reg` as used by both DEQ
              robustness papers: 4 branches 32/64/128/256, expansion 5, GN(8), weight norm,
              variational dropout 0.22, head 14/28/56/112, final 1680; 220 epochs batch 96,
              16000 pretraining steps, Jacobian loss 0.4 w.p. 0.02 until epoch 90; GPU.
    paper_xl  DEQ-XL: 72/144/288/576, head 20/40/80/160, final 1800.
Model selection uses a held-out validation split of the training set (num_val), not the test set.
"""

import ml_collections

SCALES = ("smoke", "cpu", "paper", "paper_xl")
VARIANTS = ("clean", "pgd_at", "trades", "rand", "norand", "jac", "nojac", "phantom", "exact")


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    """The DEQ config for `scale[,variant...]` (see the module docstring)."""
    parts = [p.strip() for p in str(arg).split(",") if p.strip()]
    scale = parts[0] if parts else "cpu"
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    for v in parts[1:]:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected any of {VARIANTS}")
    c = _cpu_config(scale)
    if scale == "smoke":
        _smoke(c)
    elif scale in ("paper", "paper_xl"):
        _paper(c, xl=scale == "paper_xl")
    _apply_variants(c, parts[1:])
    c.name = (
        f"DEQ({c.objective}{',rand' if c.random_intermediate else ''}"
        f"{',jac' if c.jac.weight else ''},{'exact' if c.model.ift else 'phantom'})"
    )
    return c


def _cpu_config(scale: str) -> ml_collections.ConfigDict:
    """The cpu recipe, the base the other scales modify."""
    c = ml_collections.ConfigDict()
    c.trainer = "deq"
    c.scale = scale
    c.seed = 0
    c.dataset = "fashion_mnist"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # settable: --config.data_dir=PATH
    c.force_retrain = False  # True: discard a finished/partial run whose config differs
    c.dataset_options = ml_collections.ConfigDict()
    c.num_test = ml_collections.config_dict.placeholder(int)
    c.num_train = 20000  # cpu: a 20000-image subset of the training set (None: all)
    c.num_val = 4000  # held out from the (subset of the) training set for model selection
    c.model = ml_collections.ConfigDict(
        dict(
            name="deq",
            channels=(16, 32),
            expansion=2,
            num_groups=8,
            post_gn_affine=False,
            weight_norm=True,
            dropout=0.0,
            head_channels=(16, 32),
            final_channels=256,
            stem_strides=(2,),
            # By backend and layer (ops.resolve_impl): on CPU "xla_flip" for the same-padded
            # 3 x 3 convs on inputs of >= 7 pixels (every one at this scale), whose input
            # gradient inside while loops is ~2.6x faster for PGD through the DEQ than
            # lax.conv's own transpose (BUILD_NOTES "Convolutions by layer"); patches for the
            # others; cuDNN's conv on accelerators.
            conv="auto",
            # solver (torchdeq names)
            f_solver="broyden",
            f_max_iter=8,
            f_tol=1e-3,
            b_solver="broyden",
            b_max_iter=7,
            b_tol=ml_collections.config_dict.placeholder(float),
            ift=False,  # True: exact (implicit) gradient; False: phantom
            grad=5,
            tau=0.5,
            lowest="example",
            num_layers=8,  # depth of the unrolled pretraining net
        )
    )
    c.objective = "clean"
    c.random_intermediate = False
    c.trades_beta = 6.0  # 1 / lambda
    c.adv = ml_collections.ConfigDict(dict(eps=0.1, steps=3, step_size=0.04))
    c.jac = ml_collections.ConfigDict(
        dict(weight=0.4, freq=0.02, probes=1, stop_epoch=1, rand_f_thres_delta=2)
    )
    c.val = ml_collections.ConfigDict(
        dict(eps=0.1, step_size=0.025, pgd_steps=10, pgd_examples=200)
    )
    c.optimizer = ml_collections.ConfigDict(dict(lr=3e-3, lr_min=1e-6, weight_decay=0.0))
    c.augment = ml_collections.ConfigDict(dict(crop_padding=0, pad_mode="constant", flip=False))
    c.pretrain_steps = 100
    c.batch_size = 96
    c.num_epochs = 3
    c.num_steps = 0  # > 0 overrides num_epochs
    c.eval_batch_size = 500
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0  # 0: once per epoch
    c.keep_checkpoints = 2
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    """Synthetic 28x28 data and tiny branches: seconds per run (tests)."""
    c.dataset = "synthetic"
    c.dataset_options = ml_collections.ConfigDict(
        dict(num_train=512, num_test=128, shape=(28, 28, 1), num_classes=10, seed=0)
    )
    c.num_train = None
    c.num_val = 64
    c.model.update(
        dict(channels=(4, 8), num_groups=2, head_channels=(2, 4), final_channels=16, dropout=0.1)
    )
    c.batch_size = 32
    c.num_epochs = 3
    c.pretrain_steps = 5
    c.log_every_steps = 5
    c.adv.steps = 2
    c.jac.update(dict(freq=0.5, stop_epoch=2))
    c.val.update(dict(pgd_steps=2, pgd_examples=32))
    c.eval_batch_size = 64


def _paper(c: ml_collections.ConfigDict, *, xl: bool) -> None:
    """CIFAR-10, DEQ-Large(reg) (or its XL widths) and the papers' training recipe."""
    c.dataset = "cifar10"
    c.num_train = None
    c.num_val = 5000
    c.model.update(
        dict(
            channels=(32, 64, 128, 256),
            expansion=5,
            num_groups=8,
            dropout=0.22,
            head_channels=(14, 28, 56, 112),
            final_channels=1680,
            stem_strides=(1,),
        )
    )
    if xl:
        c.model.update(
            dict(
                channels=(72, 144, 288, 576),
                head_channels=(20, 40, 80, 160),
                final_channels=1800,
            )
        )
    c.adv.update(dict(eps=8 / 255, steps=10, step_size=2 / 255))
    c.val.update(dict(eps=8 / 255, step_size=2 / 255, pgd_steps=10, pgd_examples=1000))
    c.jac.update(dict(weight=0.4, freq=0.02, probes=2, stop_epoch=90))
    c.augment.update(dict(crop_padding=4, pad_mode="constant", flip=True))
    c.optimizer.lr = 1e-3
    c.pretrain_steps = 16000
    c.batch_size = 96
    c.num_epochs = 220


def _apply_variants(c: ml_collections.ConfigDict, variants: list[str]) -> None:
    for v in variants:
        if v in ("clean", "pgd_at", "trades"):
            c.objective = v
        elif v in ("rand", "norand"):
            c.random_intermediate = v == "rand"
        elif v in ("jac", "nojac"):
            c.jac.weight = 0.0 if v == "nojac" else (c.jac.weight or 0.4)
        else:
            c.model.ift = v == "exact"
