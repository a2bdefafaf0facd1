"""Supervised training: learning, resume equivalence, determinism, errors, and the binary."""

import importlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eqrobust.configs import bp_cnn, ep_cnn
from eqrobust.train import ep as ep_train
from eqrobust.train import get_trainer, loop, supervised, workdir_lock

ROOT = Path(__file__).resolve().parents[1]


def smoke_config(**overrides):
    c = bp_cnn.get_config("smoke")
    c.update(overrides)
    return c


def test_smoke_learns_synthetic(tmp_path):
    trained = supervised.train(smoke_config(), tmp_path)
    acc = trained.history[-1]["test_accuracy"]
    assert acc > 0.8, f"smoke BP-CNN reached only {acc:.3f} on 10-class synthetic data"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [16, 32, 48]
    # The returned classifier is the trained model in eval mode.
    from eqrobust import data as data_lib

    ds = supervised.load_data(trained.config)
    pred = jnp.argmax(trained.classifier.logits_fn(data_lib.to_float(ds.x_test)), -1)
    assert abs(float(jnp.mean(pred == ds.y_test)) - acc) < 1e-6


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def test_resume_equivalence_and_determinism(tmp_path):
    # Augmentation on, checkpoint mid-epoch: resuming must replay the same batches and keys.
    cfg = smoke_config(num_epochs=2, checkpoint_every_steps=5)
    cfg.augment.update(dict(crop_padding=2, flip=True))
    straight = supervised.train(cfg, tmp_path / "a")
    stopped = supervised.train(cfg, tmp_path / "b", stop_at_step=13)
    assert stopped.history == [] or stopped.history[-1]["step"] <= 13
    resumed = supervised.train(cfg, tmp_path / "b")
    for p, q in zip(_leaves(straight.state), _leaves(resumed.state)):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6)
    assert straight.history == resumed.history or all(
        abs(a["test_accuracy"] - b["test_accuracy"]) < 1e-9
        for a, b in zip(straight.history, resumed.history)
    )
    # Same config and seed in a fresh directory: same metrics.
    again = supervised.train(cfg, tmp_path / "c")
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in straight.history]
    # A finished run only loads.
    loaded = supervised.train(cfg, tmp_path / "a")
    for p, q in zip(_leaves(straight.state), _leaves(loaded.state)):
        np.testing.assert_array_equal(p, q)


def test_epoch_hook_keeps_one_compiled_step_and_records_its_rows(tmp_path):
    from eqrobust import data as data_lib

    ds = data_lib.synthetic(num_train=24, num_test=8, shape=(4, 4, 1), num_classes=3)
    cfg = smoke_config(num_epochs=3, batch_size=8, eval_every_epochs=10**9, log_every_steps=1)
    traces, calls = [], []

    def train_step(state, x, y, key):
        traces.append(1)  # runs once per compilation (tracing), not per step
        return {"w": state["w"] + jnp.mean(x)}, {"loss": jnp.mean(x)}

    def hook(step, state):
        calls.append(step)
        return {"val_w": float(state["w"])}

    def logits(state, x):
        return x.reshape(len(x), -1)[:, :3]

    def run(**kw):
        kw.update(config=cfg, workdir=tmp_path, data=ds, init_state={"w": jnp.zeros(())})
        return loop.fit(train_step=train_step, eval_logits=logits, on_epoch_end=hook, **kw)

    run(stop_at_step=4)  # interrupted mid-epoch 2: one hook row (step 3)
    res = run()
    assert calls == [3, 6, 9] and len(traces) == 2  # one compilation per fit call
    rows = [r for r in res.history if "val_w" in r]
    assert [r["step"] for r in rows] == [3, 6, 9] and rows[-1]["epoch"] == 3.0
    assert rows[-1]["val_w"] == pytest.approx(float(res.state["w"]))


def test_eval_every_epochs_zero_never_evaluates_the_test_split(tmp_path):
    from eqrobust import data as data_lib

    ds = data_lib.synthetic(num_train=24, num_test=8, shape=(4, 4, 1), num_classes=3)
    evals = []

    def logits(state, x):
        evals.append(1)  # traced once per compilation: any test evaluation traces it
        return x.reshape(len(x), -1)[:, :3]

    def step(state, x, y, key):
        return state, {"loss": jnp.mean(x)}

    kw = dict(data=ds, init_state={"w": jnp.zeros(())}, train_step=step, eval_logits=logits)
    for every, want in ((0, False), (1, True)):
        evals.clear()
        cfg = smoke_config(num_epochs=2, batch_size=8, eval_every_epochs=every)
        res = loop.fit(config=cfg, workdir=tmp_path / str(every), **kw)
        assert bool(evals) is want
        assert [("test_accuracy" in r) for r in res.history] == [want] * (2 if want else 1)
        assert res.history[-1]["step"] == 6 and "train_loss" in res.history[-1]


def test_nan_loss_stops_with_message(tmp_path):
    cfg = smoke_config(num_epochs=1)
    cfg.optimizer.lr = 1e30
    with pytest.raises(FloatingPointError, match="loss is nan|loss is inf"):
        supervised.train(cfg, tmp_path)


def test_schedules():
    import ml_collections

    spe = 10
    step = ml_collections.ConfigDict(
        dict(lr=0.1, schedule="step", decay_every_epochs=8, decay_factor=0.3)
    )
    s = loop.make_schedule(step, spe)
    assert np.isclose(s(79), 0.1) and np.isclose(s(80), 0.03) and np.isclose(s(160), 0.009)
    cos = ml_collections.ConfigDict(dict(lr=0.2, schedule="cosine", lr_min=1e-5, cosine_epochs=100))
    s = loop.make_schedule(cos, spe)
    assert np.isclose(s(0), 0.2) and np.isclose(s(1000), 1e-5, atol=1e-9)
    assert np.isclose(s(500), (0.2 + 1e-5) / 2)
    assert s(1200) > s(1000)  # PyTorch CosineAnnealingLR is periodic past T_max
    with pytest.raises(ValueError, match="unknown schedule"):
        loop.make_schedule(ml_collections.ConfigDict(dict(lr=0.1, schedule="poly")), spe)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown trainer"):
        get_trainer("bogus")
    with pytest.raises(ValueError, match="unknown scale"):
        bp_cnn.get_config("huge")
    with pytest.raises(AttributeError):
        smoke_config().optimizer.lrr  # noqa: B018 - ConfigDict rejects unknown keys


def test_paper_config_one_step(tmp_path):
    """The paper network (CIFAR-10 layout) trains a step on CIFAR-shaped generated data."""
    cfg = bp_cnn.get_config("paper")
    cfg.dataset = "synthetic"
    cfg.dataset_options = dict(num_train=8, num_test=8, shape=(32, 32, 3), num_classes=10)
    cfg.batch_size, cfg.num_steps = 8, 1
    trained = supervised.train(cfg, None)
    assert trained.history[-1]["step"] == 1


def run_binary(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_binary_smoke_and_resume(tmp_path):
    args = ["--config=experiments/configs/bp_cnn.py:smoke", f"--workdir={tmp_path}"]
    first = run_binary(args, ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "metrics.jsonl").exists() and any((tmp_path / "checkpoints").iterdir())
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out["step"] == 48 and out["test_accuracy"] > 0.5
    second = run_binary(args, ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout.strip().splitlines()[-1]) == out
    assert "step/s" not in second.stderr  # resumed at the final step: no training bar at all
    bad = run_binary(
        [
            "--config=experiments/configs/bp_cnn.py:smoke",
            f"--workdir={tmp_path}/z",
            "--config.optimizer.lrr=0.1",
        ],
        ROOT,
    )
    assert bad.returncode != 0 and "lrr" in bad.stderr


def test_changed_config_of_a_finished_run_is_refused_naming_fields(tmp_path):
    cfg = smoke_config(num_epochs=1)
    supervised.train(cfg, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == cfg.optimizer.lr
    changed = smoke_config(num_epochs=1, log_every_steps=3)  # logging only: still loads
    supervised.train(changed, tmp_path)
    changed.optimizer.lr = 0.5
    with pytest.raises(ValueError, match=r"optimizer.lr: 0.05 -> 0.5.*new --workdir"):
        supervised.train(changed, tmp_path)
    changed.force_retrain = True
    again = supervised.train(changed, tmp_path)  # trains anew with the new config
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == 0.5
    assert again.history[-1]["step"] == 16


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    cfg = smoke_config(num_epochs=1, checkpoint_every_steps=4, keep_checkpoints=3)
    supervised.train(cfg, tmp_path, stop_at_step=8)  # checkpoints at steps 4 and 8
    ckpts = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [4, 8]
    for f in (ckpts / "8").rglob("*"):  # corrupt every file of the latest checkpoint
        if f.is_file():
            f.write_bytes(b"garbage")
    straight = supervised.train(cfg, tmp_path / "straight")
    resumed = supervised.train(cfg, tmp_path)
    cap = capsys.readouterr()
    assert "WARNING: checkpoint at step 8" in cap.out + cap.err
    for p, q in zip(_leaves(straight.state), _leaves(resumed.state)):
        np.testing.assert_allclose(p, q, rtol=1e-6, atol=1e-6)


def test_workdir_lock_makes_a_second_trainer_wait(tmp_path):
    """Two train-or-loads of one workdir never interleave: the second waits for the first."""
    events = []

    def hold():
        with workdir_lock(str(tmp_path), "first"):
            events.append("first in")
            time.sleep(0.5)
            events.append("first out")

    t = threading.Thread(target=hold)
    t.start()
    while not events:
        time.sleep(0.01)
    with workdir_lock(str(tmp_path), "second"):
        events.append("second in")
    t.join()
    assert events == ["first in", "first out", "second in"]


_CONFIG_MODULES = (
    "adv_cnn", "bp_cnn", "deq", "deq_study", "distill", "ep_cnn", "resnet18", "study", "vit"
)  # fmt: skip


def _field_paths(cfg, prefix=""):
    for k, v in cfg.items():
        yield f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            yield from _field_paths(v, f"{prefix}{k}.")


@pytest.mark.parametrize("module", _CONFIG_MODULES)
def test_no_config_field_is_named_like_a_configdict_attribute(module):
    """`--config.a.update=...` finds ConfigDict's method `update`, not a field of that name (the
    flag parser fails), so a field named like a ConfigDict attribute cannot be set from the
    command line."""
    mod = importlib.import_module(f"eqrobust.configs.{module}")
    for scale in mod.SCALES:
        paths = list(_field_paths(mod.get_config(scale)))
        bad = [p for p in paths if hasattr(ml_collections.ConfigDict, p.rsplit(".", 1)[-1])]
        assert not bad, f"{module}:{scale}: fields named like ConfigDict attributes: {bad}"


def test_ep_update_order_is_set_from_the_command_line_and_reaches_the_ep_config():
    code = (
        "from absl import app; from ml_collections import config_flags; "
        "C = config_flags.DEFINE_config_file('config'); "
        "app.run(lambda argv: print(C.value.model.update_order))"
    )  # the binaries' flag parsing (`--config.<field>=...` overrides)
    config = "--config=experiments/configs/ep_cnn.py:smoke"
    override = "--config.model.update_order=async"
    for args, expected in (([config, override], "async"), ([config], "sync")):
        out = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert out.returncode == 0 and out.stdout.split() == [expected], out.stderr[-2000:]
    cfg = ep_cnn.get_config("smoke")
    data = supervised.load_data(cfg)
    assert ep_train.build_ep_config(cfg, data).update == "sync"
    cfg.model.update_order = "async"
    assert ep_train.build_ep_config(cfg, data).update == "async"


def test_a_run_stored_under_a_renamed_config_field_still_loads():
    cfg = ep_cnn.get_config("smoke")
    stored = json.loads(json.dumps(cfg.to_dict(), default=repr))
    stored["model"]["update"] = stored["model"].pop("update_order")  # as stored before the rename
    assert loop.config_changes(stored, cfg) == []
    stored["model"]["update"] = "async"
    assert loop.config_changes(stored, cfg) == ["model.update_order: 'async' -> 'sync'"]


def test_a_run_stored_with_another_conv_formulation_still_loads():
    """The formulation fields compute the same function (tests/test_ops.py), so a DEQ run stored
    with conv "xla" (the default before "auto") resumes; a real architecture change does not."""
    from eqrobust.configs import deq as deq_configs

    cfg = deq_configs.get_config("smoke")
    stored = json.loads(json.dumps(cfg.to_dict(), default=repr))
    stored["model"]["conv"], stored["model"]["pool"] = "xla", "reduce_window"
    assert loop.config_changes(stored, cfg) == []
    stored["model"]["expansion"] = 3
    assert loop.config_changes(stored, cfg) == [f"model.expansion: 3 -> {cfg.model.expansion!r}"]
