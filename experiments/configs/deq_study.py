"""The DEQ robustness study: DEQs and their defences under intermediate and adaptive attacks.

The config lives in the package, eqrobust/configs/deq_study.py (importable after `pip install`);
this file keeps `--config=experiments/configs/deq_study.py:<scale>` working. Commands and scales:
see there.
"""

from eqrobust.configs.deq_study import SCALES, get_config  # noqa: F401
