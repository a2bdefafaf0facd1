"""ResNet-18 (CIFAR variant) trained with SGD + cross-entropy.

The config lives in the package, eqrobust/configs/resnet18.py (importable after `pip install`); this file
keeps `--config=experiments/configs/resnet18.py:<scale>` working. Commands and scales: see there.
"""

from eqrobust.configs.resnet18 import SCALES, get_config  # noqa: F401
