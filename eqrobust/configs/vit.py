"""ViT baseline of the EP robustness papers (7 layers, 12 heads, patch 4x4), Adam + warmup/cosine,
label smoothing 0.1 and AutoAugment (CIFAR-10 policy).

Run:
    python -m experiments.train --config=experiments/configs/vit.py:cpu --workdir=runs/vit

Scales:
    smoke  synthetic 28x28 data, depth 2, hidden 24; seconds (tests).
    cpu    Fashion-MNIST, depth 7, 12 heads, patch 4, hidden 96, MLP 96 (narrower than the paper's
           384 to fit 2 CPU cores), Adam 1e-3 wd 5e-5, warmup 1 epoch then cosine, label
           smoothing 0.1, AutoAugment (grayscale: see eqrobust/autoaugment.py), 2 epochs.
    paper  CIFAR-10, the small-ViT CIFAR recipe (REFERENCE_NOTES 3c): depth 7, 12 heads, patch 4,
           hidden 384, MLP 384 (6.3M parameters), dropout 0, Adam lr 1e-3 (0.9, 0.999), weight
           decay 5e-5, 5 warmup epochs then cosine to 1e-5, label smoothing 0.1, AutoAugment +
           crop 4 + flip, batch 128, 200 epochs; GPU.
"""

import ml_collections

SCALES = ("smoke", "cpu", "paper")


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    """The ViT config at `scale`."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    c = ml_collections.ConfigDict()
    c.name = "ViT"
    c.trainer = "supervised"
    c.scale = scale
    c.seed = 0
    c.dataset = "fashion_mnist"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # settable: --config.data_dir=PATH
    c.force_retrain = False  # True: discard a finished/partial run whose config differs
    c.dataset_options = ml_collections.ConfigDict()
    c.num_train = ml_collections.config_dict.placeholder(int)
    c.num_test = ml_collections.config_dict.placeholder(int)
    c.model = ml_collections.ConfigDict(
        dict(name="vit", patch=4, hidden=96, depth=7, heads=12, mlp=96, dropout=0.0)
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, weight_decay=5e-5, warmup_epochs=1,
             lr_min=1e-5)
    )  # fmt: skip
    c.label_smoothing = 0.1
    c.autoaugment = True
    c.augment = ml_collections.ConfigDict(dict(crop_padding=0, pad_mode="edge", flip=False))
    c.batch_size = 128
    c.num_epochs = 2
    c.num_steps = 0
    c.eval_every_epochs = 1
    c.eval_batch_size = 500
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0
    c.keep_checkpoints = 2
    if scale == "smoke":
        c.dataset = "synthetic"
        c.dataset_options = ml_collections.ConfigDict(
            dict(num_train=256, num_test=128, shape=(28, 28, 1), num_classes=10, seed=0)
        )
        c.model.update(dict(hidden=24, mlp=24, depth=2, heads=4))
        c.batch_size = 32
        c.num_epochs = 2
        c.eval_batch_size = 128
        c.log_every_steps = 4
    elif scale == "paper":
        c.dataset = "cifar10"
        c.model.update(dict(hidden=384, mlp=384))
        c.optimizer.warmup_epochs = 5
        c.augment.update(dict(crop_padding=4, pad_mode="constant", flip=True))
        c.num_epochs = 200
    return c
