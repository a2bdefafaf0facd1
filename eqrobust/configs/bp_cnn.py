"""BP-CNN baseline (conv -> BN -> ReLU -> max pool, then Linear), trained with SGD + cross-entropy.

Run:
    python -m experiments.train --config=experiments/configs/bp_cnn.py:cpu --workdir=runs/bp_cnn

Scales:
    smoke  synthetic 28x28 data, a few hundred steps; seconds (tests).
    cpu    Fashion-MNIST, channels 16-32 (the EP-CNN cpu layout), 6 epochs, cosine lr 0.05;
           91.4 % test accuracy, about 6 minutes on 2 cores.
    paper  CIFAR-10 as in the EP robustness papers' baseline: channels 128-256-512-512, paddings
           1,1,1,0, SGD lr 0.1 momentum 0.9, x0.3 every 8 epochs, 45 epochs, batch 200; GPU.
"""

import ml_collections

SCALES = ("smoke", "cpu", "paper")


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    """The BP-CNN config at `scale`."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    c = ml_collections.ConfigDict()
    c.name = "BP-CNN"
    c.trainer = "supervised"
    c.scale = scale
    c.seed = 0
    c.dataset = "fashion_mnist"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # settable: --config.data_dir=PATH
    c.force_retrain = False  # True: discard a finished/partial run whose config differs
    c.dataset_options = ml_collections.ConfigDict()
    c.num_train = ml_collections.config_dict.placeholder(int)  # None: all; int: a subset
    c.num_test = ml_collections.config_dict.placeholder(int)
    c.model = ml_collections.ConfigDict(
        dict(name="bp_cnn", channels=(16, 32), paddings=(1, 1), kernel_size=3, conv="auto")
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=0.05,
            momentum=0.9,
            nesterov=False,
            weight_decay=5e-4,
            schedule="cosine",
            lr_min=0.0,
            cosine_epochs=6,
            decay_every_epochs=8,
            decay_factor=0.3,
        )
    )
    c.augment = ml_collections.ConfigDict(dict(crop_padding=0, pad_mode="edge", flip=False))
    c.batch_size = 128
    c.num_epochs = 6
    c.num_steps = 0  # > 0 overrides num_epochs
    c.eval_every_epochs = 1
    c.eval_batch_size = 500
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0  # 0: once per epoch
    c.keep_checkpoints = 2

    if scale == "smoke":
        c.dataset = "synthetic"
        c.dataset_options = ml_collections.ConfigDict(
            dict(num_train=1024, num_test=256, shape=(28, 28, 1), num_classes=10, seed=0)
        )
        c.model.channels, c.model.paddings = (8, 16), (1, 1)
        c.batch_size = 64
        c.num_epochs = 3
        c.optimizer.cosine_epochs = 3
        c.log_every_steps = 10
    elif scale == "paper":
        c.dataset = "cifar10"
        c.model.channels, c.model.paddings = (128, 256, 512, 512), (1, 1, 1, 0)
        c.optimizer.update(
            dict(
                lr=0.1,
                momentum=0.9,
                weight_decay=0.0,
                schedule="step",
                decay_every_epochs=8,
                decay_factor=0.3,
            )
        )
        c.augment.update(dict(crop_padding=4, pad_mode="edge", flip=True))
        c.batch_size = 200
        c.num_epochs = 45
    return c
