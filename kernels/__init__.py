"""Pure tensor ops for composing task weights from templates. Imports nothing from recast_core or server."""

from kernels.reference import compose, segmented_template_linear

__all__ = ["compose", "segmented_template_linear"]
