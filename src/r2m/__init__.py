"""r2m: continual deployment of one deepfake detector by training-free R²M merging."""

__version__ = "0.1.0"
