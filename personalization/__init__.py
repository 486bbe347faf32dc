"""Personalize a text-to-image diffusion model from a few photos of a subject.

The engine: config, subject images, trigger token, one training loop with recipes for the two-stage method
(Zeng, Suganuma, Okatani 2024) and its baselines, artifacts loadable with plain diffusers, generation.
It never imports gradio.
"""

import logging

from .config import ConfigError, TrainingConfig

# bitsandbytes (for 8-bit Adam) is imported by peft whenever it is installed, and on CPUs with AVX512-BF16 it warns
# at import that an optional 4-bit kernel is missing: a line about a feature this project never uses.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["ConfigError", "TrainingConfig"]
