"""eqrobust: equilibrium models and their robustness, in JAX/Flax."""

__version__ = "0.1.0"
