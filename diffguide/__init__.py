"""diffguide: an experiment runner for guided diffusion sampling."""

__version__ = "0.1.0"
