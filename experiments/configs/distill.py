"""Attractor distillation of an EP-CNN into a feedforward student (full-state, last-layer, ResNet-18).

The config lives in the package, eqrobust/configs/distill.py (importable after `pip install`); this file
keeps `--config=experiments/configs/distill.py:<scale>` working. Commands and scales: see there.
"""

from eqrobust.configs.distill import SCALES, get_config  # noqa: F401
