"""Flax NNX feedforward networks."""
