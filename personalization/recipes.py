"""Recipes: what each method trains, with which prompts and losses, in which order.

The training loop (:mod:`personalization.trainer`) knows nothing about methods; it runs the stages a recipe lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import ResolvedConfig
from .tokens import build_prompts

Trainable = Literal["embedding", "unet_full", "unet_lora"]


@dataclass(frozen=True)
class StagePlan:
    """One stage of a recipe.

    ``trainable`` says what moves: only the trigger's embedding row, all U-Net weights, or LoRA adapters on the U-Net's
    attention projections. ``train_text_encoder`` (DreamBooth only) also trains the text encoder (fully, or with
    LoRA when the U-Net uses LoRA). When the text side is frozen, the loop computes the prompt conditionings once.
    """

    name: str
    trainable: Trainable
    steps: int
    learning_rate: float
    prompts: tuple[str, ...]
    weight_decay: float = 0.0
    train_text_encoder: bool = False
    prior_preservation: bool = False

    @property
    def text_frozen(self) -> bool:
        return self.trainable != "embedding" and not self.train_text_encoder


@dataclass(frozen=True)
class Recipe:
    method: str
    stages: tuple[StagePlan, ...]
    learns_token: bool

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    @property
    def needs_class_images(self) -> bool:
        return any(stage.prior_preservation for stage in self.stages)


def recipe_for(config: ResolvedConfig) -> Recipe:
    """The stages of ``config.method``."""
    prompts = tuple(build_prompts(config.prompt_templates, config.trigger_token, config.class_noun))
    embedding_stage = StagePlan(
        name="stage 1 · trigger embedding" if config.method == "two_stage" else "textual inversion",
        trainable="embedding",
        steps=config.stage1_steps,
        learning_rate=config.stage1_learning_rate,
        prompts=prompts,
        weight_decay=config.stage1_weight_decay,
    )
    unet_trainable: Trainable = "unet_lora" if config.uses_lora else "unet_full"
    if config.method == "textual_inversion":
        return Recipe(config.method, (embedding_stage,), learns_token=True)
    if config.method == "two_stage":
        # Stage 2 trains the U-Net alone: text encoder and the stage-1 embedding stay frozen, no class images.
        unet_stage = StagePlan("stage 2 · U-Net " + config.stage2_mode, unet_trainable, config.stage2_steps,
                               config.stage2_learning_rate, prompts)
        return Recipe(config.method, (embedding_stage, unet_stage), learns_token=True)
    dreambooth_stage = StagePlan(
        name="DreamBooth" + (" LoRA" if config.uses_lora else ""),
        trainable=unet_trainable,
        steps=config.stage2_steps,
        learning_rate=config.stage2_learning_rate,
        prompts=prompts,
        train_text_encoder=config.train_text_encoder,
        prior_preservation=config.prior_preservation,
    )
    return Recipe(config.method, (dreambooth_stage,), learns_token=False)
