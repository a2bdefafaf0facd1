"""ViT baseline (7 layers, 12 heads, patch 4), AutoAugment + label smoothing.

The config lives in the package, eqrobust/configs/vit.py (importable after `pip install`); this file
keeps `--config=experiments/configs/vit.py:<scale>` working. Commands and scales: see there.
"""

from eqrobust.configs.vit import SCALES, get_config  # noqa: F401
