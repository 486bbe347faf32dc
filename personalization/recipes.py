"""Recipes: what each method trains, with which prompts and losses, in which order.

The training loop (:mod:`personalization.trainer`) knows nothing about methods; it runs the stages a recipe lists.
Each method's stages are built by its spec (:mod:`personalization.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .methods import StagePlan, Trainable, method_spec
from .tokens import build_prompts

if TYPE_CHECKING:
    from .config import ResolvedConfig

__all__ = ["Recipe", "StagePlan", "Trainable", "recipe_for"]


@dataclass(frozen=True)
class Recipe:
    method: str
    stages: tuple[StagePlan, ...]

    @property
    def learns_token(self) -> bool:
        """Whether the method learns a new trigger embedding (its spec says; stored nowhere else)."""
        return method_spec(self.method).learns_token

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    @property
    def needs_class_images(self) -> bool:
        return any(stage.prior_preservation for stage in self.stages)


def recipe_for(config: ResolvedConfig) -> Recipe:
    """The stages of ``config.method``, as its spec builds them."""
    prompts = tuple(build_prompts(config.prompt_templates, config.trigger_token, config.class_noun))
    return Recipe(config.method, method_spec(config.method).build_stages(config, prompts))
