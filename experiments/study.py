"""Train-or-load EP-CNN, BP-CNN and Adv-CNNs, evaluate them, write report.md, results.json, plots.

python -m experiments.study --config=experiments/configs/study.py:cpu --workdir=runs/demo
"""

import time

import matplotlib
from absl import app, flags, logging
from ml_collections import config_flags

from eqrobust import host

host.split_cpu()  # before JAX starts: an evaluation's attack chunks use every core

from eqrobust import report, study  # noqa: E402

matplotlib.use("Agg")  # files only; the library itself never picks a backend

_CONFIG = config_flags.DEFINE_config_file("config", None, "Study config file (study.py:scale).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Model runs and the report go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    results = study.run_study(_CONFIG.value, _WORKDIR.value)
    header, rows = report.summary_rows(results)
    print(report.md_table(header, rows))
    logging.info(
        "study finished in %.1f s; report in %s/report.md", time.perf_counter() - t0, _WORKDIR.value
    )
    print(f"study finished in {time.perf_counter() - t0:.1f} s; report: {_WORKDIR.value}/report.md")


if __name__ == "__main__":
    app.run(main)
