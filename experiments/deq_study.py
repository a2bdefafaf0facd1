"""Train-or-load the DEQs, attack them and their defences, write deq_report.md and deq_results.json.

python -m experiments.deq_study --config=experiments/configs/deq_study.py:cpu \
    --workdir=runs/deq_demo
"""

import time

import matplotlib
from absl import app, flags, logging
from ml_collections import config_flags

from eqrobust import host

host.split_cpu()  # before JAX starts: two lanes of attacks on the two cores (eqrobust.deq_study)

from eqrobust import deq_study  # noqa: E402
from eqrobust.report import deq as deq_report  # noqa: E402

matplotlib.use("Agg")  # files only; the library itself never picks a backend

_CONFIG = config_flags.DEFINE_config_file("config", None, "DEQ study config (deq_study.py:scale).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Model runs and the report go here.")
_OUT = flags.DEFINE_string("out_dir", None, "Report directory (default: workdir).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # orbax logs every checkpoint at INFO
        logging.set_verbosity(logging.WARNING)
    t0 = time.perf_counter()
    out = _OUT.value or _WORKDIR.value
    results = deq_study.run_deq_study(_CONFIG.value, _WORKDIR.value, out_dir=out)
    print(deq_report.summary_table(results))
    print(f"DEQ study finished in {time.perf_counter() - t0:.1f} s; report: {out}/deq_report.md")


if __name__ == "__main__":
    app.run(main)
