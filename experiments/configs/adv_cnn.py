"""Adv-CNN baseline: the BP-CNN trained with PGD-L2 adversarial training (Madry et al.).

The config lives in the package, eqrobust/configs/adv_cnn.py (importable after `pip install`); this file
keeps `--config=experiments/configs/adv_cnn.py:<scale>` working. Commands and scales: see there.
"""

from eqrobust.configs.adv_cnn import SCALES, get_config  # noqa: F401
