"""RECAST core: template banks, Neural Mimicry, reparameterization, task training and task artifacts."""
