"""Deep equilibrium models (MDEQ): clean, PGD-AT or TRADES training; phantom or exact gradient.

The config lives in the package, eqrobust/configs/deq.py (importable after `pip install`); this file
keeps `--config=experiments/configs/deq.py:<scale>[,variant...]` working. Commands and scales: see
there.
"""

from eqrobust.configs.deq import SCALES, VARIANTS, get_config  # noqa: F401
