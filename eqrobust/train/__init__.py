"""Training loops: supervised, adversarial, EP."""
