"""Shims: the configs live in `eqrobust.configs` (installed with the package); these paths keep `--config=experiments/configs/<name>.py:<scale>` working."""
