"""BP-CNN baseline (conv -> BN -> ReLU -> max pool, then Linear), trained with SGD + cross-entropy.

The config lives in the package, eqrobust/configs/bp_cnn.py (importable after `pip install`); this file
keeps `--config=experiments/configs/bp_cnn.py:<scale>` working. Commands and scales: see there.
"""

from eqrobust.configs.bp_cnn import SCALES, get_config  # noqa: F401
