"""Trains any model of eqrobust from a config file; rerunning resumes from the last checkpoint.

python -m experiments.train --config=experiments/configs/bp_cnn.py:cpu --workdir=runs/bp_cnn
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from eqrobust.train import get_trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/configs/bp_cnn.py:cpu", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and results go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO; -v 0 shows it
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    trained = get_trainer(config.trainer)(config, _WORKDIR.value)
    final = trained.history[-1] if trained.history else {}
    print(
        json.dumps(
            {
                "model": config.get("name", config.trainer),
                "workdir": _WORKDIR.value,
                "step": final.get("step"),
                "test_accuracy": final.get("test_accuracy"),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
