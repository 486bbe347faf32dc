"""The methods the engine trains, one :class:`MethodSpec` each: the one place that says what a method is.

The config (defaults, which options a method takes, resolution), the recipes (its stages), the model card (its
wording, citation and Hub tags), the CLI (``--method`` choices) and the app (labels, which options to show) all read
the spec; none of them tests a method's name. Adding a method is a change in this file: its key in :data:`Method` and
a spec in :data:`SPECS`.

This module imports nothing from :mod:`personalization.config` at run time (config imports it for the defaults and
the rules); the configs the stage builders take are typed only.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import ResolvedConfig

# The registry's keys, in order, as a type: `TrainingConfig.method` is typed by it and it must list the keys of
# SPECS (tests/test_methods.py checks it).
Method = Literal["two_stage", "textual_inversion", "dreambooth", "dreambooth_lora"]
DEFAULT_METHOD: Method = "two_stage"

Trainable = Literal["embedding", "unet_full", "unet_lora"]
# What a method does with the U-Net: nothing, a fixed mode (full weights or LoRA), or the mode the config's
# stage2_mode chooses.
UNetTraining = Literal["none", "full", "lora", "chosen"]

# The Hub's tag for a repo that holds a textual-inversion embedding (diffusers' load_textual_inversion loads it): the
# card of every method that learns a token carries it, besides the method's own hub_tags.
LEARNED_TOKEN_HUB_TAG = "textual_inversion"

# The options only some methods take (each a boolean config field), in the order validation checks them, with the
# refusal a method that does not take one gives unless its spec words its own.
OPTIONS: dict[str, str] = {
    "prior_preservation": "prior_preservation is a DreamBooth option; method {key!r} trains without class images",
    "train_text_encoder": "train_text_encoder is a DreamBooth option; method {key!r} keeps the text encoder frozen",
}


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


StageBuilder = Callable[["ResolvedConfig", tuple[str, ...]], tuple[StagePlan, ...]]


@dataclass(frozen=True)
class MethodDefaults:
    """A method's starting hyperparameters (docs/measurements.md#starting-hyperparameters); the subject preset scales
    the steps. ``stage2_learning_rate`` None: the stage-2 mode's rate (``config.STAGE2_LEARNING_RATES``).
    ``mini_world_full_unet_learning_rate`` None: the mini model's own full-U-Net rate
    (``config.MINI_WORLD_UNET_LEARNING_RATES``)."""

    stage1_steps: int
    stage1_learning_rate: float
    stage2_steps: int
    stage2_learning_rate: float | None
    mini_world_full_unet_learning_rate: float | None = None


@dataclass(frozen=True)
class MethodSpec:
    """Everything that makes one method what it is.

    ``key``: the config's ``method`` value. ``label``: the app's name for it. ``card_name``: the model card's
    wording, with its citation. ``hub_tags``: its tags on the card. ``defaults``: its starting hyperparameters.
    ``unet``: what it does with the U-Net (see :data:`UNetTraining`). ``learns_token``: it learns a new trigger
    embedding (stage 1, written as learned_embeds.safetensors); otherwise it uses an existing word as its identifier
    (DreamBooth's ``sks``) and has no stage 1. ``accepts``: the :data:`OPTIONS` it takes. ``refusals``: (option,
    sentence) pairs for options it does not take, where :data:`OPTIONS`' sentence would not say why.
    ``build_stages``: its stages, from the resolved config and its training prompts.
    """

    key: str
    label: str
    card_name: str
    hub_tags: tuple[str, ...]
    defaults: MethodDefaults
    unet: UNetTraining
    learns_token: bool
    build_stages: StageBuilder
    accepts: frozenset[str] = frozenset()
    refusals: tuple[tuple[str, str], ...] = ()

    @property
    def uses_identifier(self) -> bool:
        """The trigger is an existing word (an identifier such as ``sks``), not a new token."""
        return not self.learns_token

    @property
    def trains_unet(self) -> bool:
        return self.unet != "none"

    @property
    def chooses_stage2_mode(self) -> bool:
        """The config's ``stage2_mode`` picks LoRA or the full U-Net (otherwise the spec fixes it, or there is none)."""
        return self.unet == "chosen"

    def stage2_mode(self, chosen: str) -> str:
        """The stage-2 mode a config of this method records, given the mode the config chooses (or would default
        to). A method without a U-Net stage records "full", which nothing reads."""
        if self.unet == "chosen":
            return chosen
        return "lora" if self.unet == "lora" else "full"

    def refusal(self, option: str) -> str | None:
        """Why this method does not take ``option`` (one of :data:`OPTIONS`); None when it does."""
        if option in self.accepts:
            return None
        return dict(self.refusals).get(option) or OPTIONS[option].format(key=self.key)


# ---- stage builders ---------------------------------------------------------------------------------------------
def _unet_trainable(config: ResolvedConfig) -> Trainable:
    return "unet_lora" if config.uses_lora else "unet_full"


def _embedding_stage(config: ResolvedConfig, prompts: tuple[str, ...], name: str) -> StagePlan:
    return StagePlan(name=name, trainable="embedding", steps=config.stage1_steps,
                     learning_rate=config.stage1_learning_rate, prompts=prompts,
                     weight_decay=config.stage1_weight_decay)


def _two_stage_stages(config: ResolvedConfig, prompts: tuple[str, ...]) -> tuple[StagePlan, ...]:
    # Stage 2 trains the U-Net alone: text encoder and the stage-1 embedding stay frozen, no class images.
    unet_stage = StagePlan("stage 2 · U-Net " + config.stage2_mode, _unet_trainable(config), config.stage2_steps,
                           config.stage2_learning_rate, prompts)
    return _embedding_stage(config, prompts, "stage 1 · trigger embedding"), unet_stage


def _textual_inversion_stages(config: ResolvedConfig, prompts: tuple[str, ...]) -> tuple[StagePlan, ...]:
    return (_embedding_stage(config, prompts, "textual inversion"),)


def _dreambooth_stages(config: ResolvedConfig, prompts: tuple[str, ...]) -> tuple[StagePlan, ...]:
    return (StagePlan(
        name="DreamBooth" + (" LoRA" if config.uses_lora else ""),
        trainable=_unet_trainable(config),
        steps=config.stage2_steps,
        learning_rate=config.stage2_learning_rate,
        prompts=prompts,
        train_text_encoder=config.train_text_encoder,
        prior_preservation=config.prior_preservation,
    ),)


# ---- the registry -----------------------------------------------------------------------------------------------
SPECS: dict[str, MethodSpec] = {spec.key: spec for spec in (
    MethodSpec(
        key="two_stage",
        label="Two-stage (recommended)",
        card_name="two-stage personalization (Zeng, Suganuma, Okatani 2024): textual inversion of a rare adjective, "
        "then U-Net fine-tuning with the text encoder and the embedding frozen, without prior preservation",
        hub_tags=("two-stage-personalization",),
        # On the mini model the full U-Net trains 400 steps to DreamBooth's 800, at twice its rate: on the README's
        # curves (4 subjects x 3 seeds) 2e-4 reached DreamBooth's last-step fidelity, 1e-4 trailed it by 0.033.
        defaults=MethodDefaults(stage1_steps=100, stage1_learning_rate=5e-3, stage2_steps=400,
                                stage2_learning_rate=None, mini_world_full_unet_learning_rate=2e-4),
        unet="chosen",
        learns_token=True,
        build_stages=_two_stage_stages,
    ),
    MethodSpec(
        key="textual_inversion",
        label="Textual Inversion",
        card_name="Textual Inversion (Gal et al. 2022)",
        hub_tags=("textual-inversion",),
        defaults=MethodDefaults(stage1_steps=3000, stage1_learning_rate=5e-4, stage2_steps=0,
                                stage2_learning_rate=0.0),
        unet="none",
        learns_token=True,
        build_stages=_textual_inversion_stages,
    ),
    MethodSpec(
        key="dreambooth",
        label="DreamBooth",
        card_name="DreamBooth (Ruiz et al. 2023), full U-Net fine-tuning",
        hub_tags=("dreambooth",),
        defaults=MethodDefaults(stage1_steps=0, stage1_learning_rate=0.0, stage2_steps=800,
                                stage2_learning_rate=5e-6),
        unet="full",
        learns_token=False,
        build_stages=_dreambooth_stages,
        accepts=frozenset({"prior_preservation", "train_text_encoder"}),
    ),
    MethodSpec(
        key="dreambooth_lora",
        label="DreamBooth-LoRA",
        card_name="DreamBooth with LoRA on the U-Net",
        hub_tags=("dreambooth",),
        defaults=MethodDefaults(stage1_steps=0, stage1_learning_rate=0.0, stage2_steps=800,
                                stage2_learning_rate=1e-4),
        unet="lora",
        learns_token=False,
        build_stages=_dreambooth_stages,
        accepts=frozenset({"prior_preservation"}),
        # transformers 5 loads text-encoder LoRA only with peft >= 0.22, which is not released for these pins:
        # a pushed text-encoder LoRA would not load in plain diffusers.
        refusals=(("train_text_encoder",
                   "train_text_encoder is not available with dreambooth_lora (text-encoder LoRA would not load in "
                   "diffusers with peft 0.21); use method 'dreambooth' to train the text encoder"),),
    ),
)}

METHODS: tuple[str, ...] = tuple(SPECS)
if typing.get_args(Method) != METHODS:
    raise ImportError(f"methods.Method {typing.get_args(Method)} must list the keys of SPECS {METHODS}, in order")


def method_keys() -> tuple[str, ...]:
    """The registered methods' keys, in order (what the config, the CLI and the app offer)."""
    return tuple(SPECS)


def method_spec(key: str) -> MethodSpec:
    """The spec of method ``key``; ValueError for a key that is not registered."""
    try:
        return SPECS[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {key!r}; one of {', '.join(SPECS)}") from None
