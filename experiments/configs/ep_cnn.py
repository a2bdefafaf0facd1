"""EP-CNN (Hopfield-like conv energy, trained with symmetric-nudging equilibrium propagation).

The config lives in the package, eqrobust/configs/ep_cnn.py (importable after `pip install`); this file
keeps `--config=experiments/configs/ep_cnn.py:<scale>` working. Commands and scales: see there.
"""

from eqrobust.configs.ep_cnn import SCALES, get_config  # noqa: F401
