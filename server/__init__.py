"""HTTP inference server (FastAPI). Imports recast_core and kernels, never the other way round."""
