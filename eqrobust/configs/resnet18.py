"""ResNet-18 (CIFAR variant: 3x3 stem, no initial max pool), trained with SGD + cross-entropy.

Run:
    python -m experiments.train --config=experiments/configs/resnet18.py:cpu --workdir=runs/resnet18

Scales:
    smoke  synthetic 28x28 data, width 4, a few steps; seconds (tests).
    cpu    Fashion-MNIST, width 16 (channels 16-32-64-128; depth and layout of ResNet-18), SGD
           0.05 momentum 0.9 wd 5e-4, batch 128, 1 epoch (the per-epoch cosine is then constant);
           minutes on 2 cores.
    paper  CIFAR-10, the standard CIFAR ResNet-18 recipe (width 64, 11.2M parameters): SGD lr 0.1
           momentum 0.9 wd 5e-4, cosine over 200 epochs, batch 128, crop 4 + flip; GPU. (The
           distillation paper gives no ResNet hyperparameters.)
"""

import ml_collections

SCALES = ("smoke", "cpu", "paper")


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    """The ResNet-18 config at `scale`."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")
    c = ml_collections.ConfigDict()
    c.name = "ResNet-18"
    c.trainer = "supervised"
    c.scale = scale
    c.seed = 0
    c.dataset = "fashion_mnist"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # settable: --config.data_dir=PATH
    c.force_retrain = False  # True: discard a finished/partial run whose config differs
    c.dataset_options = ml_collections.ConfigDict()
    c.num_train = ml_collections.config_dict.placeholder(int)
    c.num_test = ml_collections.config_dict.placeholder(int)
    c.model = ml_collections.ConfigDict(dict(name="resnet18", width=16, blocks=(2, 2, 2, 2)))
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="sgd",
            lr=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            schedule="cosine",
            lr_min=0.0,
            cosine_epochs=1,
        )
    )
    c.label_smoothing = 0.0
    c.autoaugment = False
    c.augment = ml_collections.ConfigDict(dict(crop_padding=0, pad_mode="edge", flip=False))
    c.batch_size = 128
    c.num_epochs = 1
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
        c.model.width = 4
        c.batch_size = 32
        c.num_epochs = 2
        c.eval_batch_size = 128
        c.log_every_steps = 4
    elif scale == "paper":
        c.dataset = "cifar10"
        c.model.width = 64
        c.optimizer.update(dict(lr=0.1, cosine_epochs=200))
        c.augment.update(dict(crop_padding=4, pad_mode="constant", flip=True))
        c.num_epochs = 200
    return c
