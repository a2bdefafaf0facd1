"""Evaluate already-trained models of a study (no training) and write the report.

    python -m experiments.evaluate --config=experiments/configs/study.py:cpu --workdir=runs/demo \
        --models=bp_cnn,adv_cnn_05 --out=runs/demo/eval2 --config.eval.pgd_l2.num_examples=1000
"""

import matplotlib
from absl import app, flags, logging
from ml_collections import config_flags

from eqrobust import host

host.split_cpu()  # before JAX starts: an evaluation's attack chunks use every core

from eqrobust import report, study  # noqa: E402

matplotlib.use("Agg")  # files only; the library itself never picks a backend

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file (study.py:scale).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding the trained runs <model key>/.")
_MODELS = flags.DEFINE_list("models", None, "Model keys to evaluate (default: all of the config).")
_OUT = flags.DEFINE_string("out", None, "Report directory (default: --workdir).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    results = study.run_study(
        _CONFIG.value,
        _WORKDIR.value,
        out_dir=_OUT.value,
        only=_MODELS.value,
        require_trained=True,
    )
    header, rows = report.summary_rows(results)
    print(report.md_table(header, rows))


if __name__ == "__main__":
    app.run(main)
