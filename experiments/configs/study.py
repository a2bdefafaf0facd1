"""The robustness study: EP-CNN, BP-CNN, Adv-CNN(0.5), Adv-CNN(1.0) trained (or loaded), attacked,

The config lives in the package, eqrobust/configs/study.py (importable after `pip install`); this file
keeps `--config=experiments/configs/study.py:<scale>[,zoo]` working. Commands, scales and the `zoo`
option (the model-zoo rows): see there.
"""

from eqrobust.configs.study import SCALES, get_config  # noqa: F401
