"""Personalize a text-to-image diffusion model from a few photos of a subject.

The engine: config, subject images, trigger token, one training loop with recipes for the two-stage method
(Zeng, Suganuma, Okatani 2024) and its baselines, artifacts loadable with plain diffusers, generation.
It never imports gradio.
"""

from .config import ConfigError, TrainingConfig

__all__ = ["ConfigError", "TrainingConfig"]
