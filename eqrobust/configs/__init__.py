"""Experiment configs (ml_collections), installed with the package; each file has `get_config(scale)`."""
