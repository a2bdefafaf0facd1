"""Attractor distillation (ep-distillation eqs. 8-9) of a trained EP-CNN into a feedforward student.

Run (the teacher is trained first if its workdir holds no finished run):
    python -m experiments.train --config=experiments/configs/distill.py:cpu \
        --config.teacher_workdir=runs/ep_cnn --workdir=runs/distill
    python -m experiments.train --config=experiments/configs/distill.py:cpu,last_layer \
        --config.teacher_workdir=runs/ep_cnn --workdir=runs/distill_ll
    python -m experiments.train --config=experiments/configs/distill.py:cpu,resnet18 \
        --config.teacher_workdir=runs/ep_cnn --workdir=runs/distill_resnet18

Argument: `<scale>[,<variant>]`.
Variants:
    full_state  (default) Distilled BP-CNN: the EP-CNN's layout ("ep_student"), loss eq. 8 =
                sum_l MSE(s*_l, s~_l) + CE(softmax(teacher logits), student), layer-wise lrs.
    last_layer  Distilled BP-CNN(ll): same model, loss eq. 9 (the CE term only).
    resnet18    ResNet-18 student (resnet18.py's model, optimizer, epochs and batch size at this
                scale), loss eq. 9.
Scales (the teacher is eqrobust/configs/ep_cnn.py at the same scale, in config.teacher):
    smoke  synthetic data, the smoke EP-CNN; seconds (tests; set teacher_workdir).
    cpu    Fashion-MNIST, teacher ep_cnn:cpu (runs/ep_cnn), batch 64, 3 epochs, layer lrs
           0.2/0.1/0.05 cosine, SGD momentum 0.9; the teacher's 15-step free phase runs inside
           every training step.
    paper  CIFAR-10, teacher ep_cnn:paper (T1=250), crop+flip, batch 128, 120 epochs with cosine
           T_max=100 like the teacher. The paper publishes no distillation hyperparameters; the
           layer lrs 0.1/0.1/0.05/0.05/0.02 are our choice (ResNet-18 variant: SGD 0.1 cosine).
"""

import ml_collections

from eqrobust.configs import ep_cnn, resnet18, vit

SCALES = ("smoke", "cpu", "paper")
VARIANTS = ("full_state", "last_layer", "resnet18")
NAMES = {
    "full_state": "Distilled BP-CNN",
    "last_layer": "Distilled BP-CNN(ll)",
    "resnet18": "ResNet-18 student",
}


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    """The distillation config for `arg` = "<scale>[,<variant>]" (e.g. "cpu,last_layer")."""
    scale, _, variant = arg.partition(",")
    variant = variant or "full_state"
    if scale not in SCALES or variant not in VARIANTS:
        raise ValueError(
            f"unknown config {arg!r}; expected '<scale>[,<variant>]' with scale in {SCALES} and "
            f"variant in {VARIANTS}"
        )
    teacher = ep_cnn.get_config(scale)
    c = ml_collections.ConfigDict()
    c.name = NAMES[variant]
    c.trainer = "distill"
    c.scale, c.variant, c.seed = scale, variant, 0
    c.teacher = teacher
    c.teacher_workdir = {"smoke": None, "cpu": "runs/ep_cnn", "paper": "runs/ep_cnn_paper"}[scale]
    for k in ("dataset", "dataset_options", "num_train", "num_test"):
        c[k] = teacher[k]  # the student sees the teacher's data
    c.data_dir = ml_collections.config_dict.placeholder(str)  # settable: --config.data_dir=PATH
    c.force_retrain = False  # True: discard a finished/partial run whose config differs
    c.data_dir = teacher.get("data_dir", None)
    tm = teacher.model
    c.model = ml_collections.ConfigDict(
        dict(
            name="ep_student",
            channels=tm.channels,
            paddings=tm.paddings,
            kernel_size=tm.kernel_size,
            fc=tm.fc,
            activation=tm.activation,
            # By backend and layer (ops.resolve_impl; the same function as the teacher's
            # "patches"): on CPU patches for the first conv and for unpadded or tiny ones,
            # "xla_flip" for the rest. Against lax.conv ("xla"): PGD-20 6.4x faster, a training
            # gradient 1.2x slower (BUILD_NOTES "Convolutions by layer"); the attacks are most
            # of a student's time. cuDNN's conv on accelerators.
            conv="auto",
            pool=tm.pool,
            mean=tm.mean,  # None: training-set statistics, as the teacher
            std=tm.std,
            std_scale=tm.std_scale,
        )
    )
    c.distill = ml_collections.ConfigDict(
        dict(loss="full_state" if variant == "full_state" else "last_layer",
             ce_target="teacher", state_weight=1.0)
    )  # fmt: skip
    c.optimizer = ml_collections.ConfigDict(
        dict(lrs=(0.2, 0.1, 0.05), momentum=0.9, weight_decay=0.0, schedule="cosine",
             lr_min=1e-5, cosine_epochs=3)
    )  # fmt: skip
    c.augment = ml_collections.ConfigDict(teacher.augment.to_dict())
    c.batch_size = 64
    c.num_epochs = 3
    c.num_steps = 0
    c.eval_every_epochs = 1
    c.eval_batch_size = 1000
    c.log_every_steps = 25
    c.checkpoint_every_steps = 0
    c.keep_checkpoints = 2
    if scale == "smoke":
        c.optimizer.update(dict(cosine_epochs=4))
        c.batch_size, c.num_epochs, c.eval_batch_size, c.log_every_steps = 64, 4, 256, 4
    elif scale == "paper":
        c.optimizer.update(
            dict(lrs=(0.1, 0.1, 0.05, 0.05, 0.02), weight_decay=5e-4, cosine_epochs=100)
        )
        c.batch_size, c.num_epochs, c.eval_batch_size = 128, 120, 500
    if variant == "resnet18":
        r = resnet18.get_config(scale)
        c.model = r.model
        c.optimizer = ml_collections.ConfigDict(r.optimizer.to_dict())
        c.num_epochs, c.batch_size = r.num_epochs, r.batch_size  # the ResNet-18 recipe
        c.optimizer.cosine_epochs = c.num_epochs
        c.optimizer.lrs = ()
    return c


def study_entries(
    teacher_config: ml_collections.ConfigDict, teacher_workdir: str, study_workdir: str
) -> dict[str, tuple[ml_collections.ConfigDict, str]]:
    """The model-zoo rows of a study: name -> (training config, workdir).

    Distilled BP-CNN, Distilled BP-CNN(ll) and the ResNet-18 student distil `teacher_config`
    (an EP-CNN config, trained or loaded at `teacher_workdir`); ResNet-18 and ViT are trained
    from labels. All use `teacher_config.scale` and the teacher's dataset fields.
    """
    scale = teacher_config.scale
    out: dict[str, tuple[ml_collections.ConfigDict, str]] = {}
    for variant in VARIANTS:
        c = get_config(f"{scale},{variant}")
        c.teacher = teacher_config
        c.teacher_workdir = teacher_workdir
        for k in ("dataset", "data_dir", "dataset_options", "num_train", "num_test"):
            c[k] = teacher_config.get(k, None)
        out[c.name] = (c, f"{study_workdir}/distill_{variant}")
    for name, module in (("ResNet-18", resnet18), ("ViT", vit)):
        c = module.get_config(scale)
        for k in ("dataset", "data_dir", "dataset_options", "num_train", "num_test"):
            c[k] = teacher_config[k]
        out[name] = (c, f"{study_workdir}/{module.__name__.rsplit('.', 1)[-1]}")
    return out
