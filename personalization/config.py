"""The one validated settings object for a training run, shared by the CLI, the app and the benchmarks.

Fields left as ``None`` take the method's (and subject preset's) default when the config is resolved, so the saved
``training_config.json`` always records the numbers that were actually used.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from .methods import DEFAULT_METHOD, OPTIONS, Method, MethodSpec, method_keys, method_spec
from .methods import METHODS as METHODS  # re-exported: the registered methods, in order

Stage2Mode = Literal["full", "lora"]
SubjectType = Literal["object", "pet", "person", "style"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]

STAGE2_MODES: tuple[str, ...] = typing.get_args(Stage2Mode)
SUBJECT_TYPES: tuple[str, ...] = typing.get_args(SubjectType)
MIXED_PRECISIONS: tuple[str, ...] = typing.get_args(MixedPrecision)


@dataclass(frozen=True)
class GenerationDefaults:
    """Generation's defaults and limits, in one place: ``GenerationRequest``, the CLI's ``generate`` and
    ``evaluate``, the training run's sample images, the app's sliders and the card's snippet read them here."""

    steps: int = 25
    guidance_scale: float = 5.0
    lora_scale: float = 1.0
    num_images: int = 1
    seed: int = 0
    negative_prompt: str = ""
    max_steps: int = 200
    max_guidance_scale: float = 50.0
    max_lora_scale: float = 2.0
    max_num_images: int = 8


GENERATION_DEFAULTS = GenerationDefaults()

MAX_SUBJECT_IMAGES = 50

# Starting points from common practice (docs/measurements.md#starting-hyperparameters), as each method's defaults
# (methods.MethodDefaults) are; the benchmarks decide the final ones.
STAGE2_LEARNING_RATES: dict[str, float] = {"full": 2e-6, "lora": 1e-4}
MINI_WORLD_UNET_LEARNING_RATES: dict[str, float] = {"full": 1e-4, "lora": 1e-3}

# DreamBooth's identifier: an existing rare token whose prior is weak, as in the DreamBooth paper.
DEFAULT_IDENTIFIER = "sks"

# The mini world's name: its models say so in training_info.json (scripts/train_mini_model.py writes it), which is
# how a folder is recognized by what it is, wherever it lives.
MINI_WORLD_NAME = "mini-shapes"
MINI_WORLD_INFO_FILE = "training_info.json"
# Backgrounds the mini world was drawn on (personalization.mini_world.world.COLORS): its models know no other places.
MINI_WORLD_BACKGROUNDS = ("blue", "green", "yellow", "black")
# The symbolic name of the mini model bundled in personalization/assets (see personalization.device).
BUNDLED_MINI_MODEL = f"bundled:{MINI_WORLD_NAME}"

ADJECTIVE_TEMPLATES = (
    "a photo of a {trigger} {noun}",
    "a rendering of a {trigger} {noun}",
    "a cropped photo of the {trigger} {noun}",
    "the photo of a {trigger} {noun}",
    "a close-up photo of a {trigger} {noun}",
    "a bright photo of the {trigger} {noun}",
    "a good photo of a {trigger} {noun}",
    "a photo of one {trigger} {noun}",
)
# The mini model's text encoder only ever read captions of its shapes world; words like "rendering" or "close-up"
# kept their random initial embeddings there, so its prompts stay inside that vocabulary.
MINI_WORLD_TEMPLATES = (
    "a photo of a {trigger} {noun}",
    "a {trigger} {noun}",
)
STYLE_TEMPLATES = (
    "a painting in {trigger} {noun}",
    "a rendering in {trigger} {noun}",
    "a picture in {trigger} {noun}",
    "an illustration in {trigger} {noun}",
)


@dataclass(frozen=True)
class SubjectPreset:
    """What a kind of subject changes: prompt templates, whether flips are safe, and step multipliers."""

    subject_type: str
    default_class_noun: str
    prompt_templates: tuple[str, ...]
    flip: bool
    steps_scale: float = 1.0


PRESETS: dict[str, SubjectPreset] = {
    # Objects often carry text or asymmetric logos, so flipping would teach a mirrored subject.
    "object": SubjectPreset("object", "object", ADJECTIVE_TEMPLATES, flip=False),
    "pet": SubjectPreset("pet", "dog", ADJECTIVE_TEMPLATES, flip=True),
    # Faces need more steps to hold identity; hair partings make flips borderline, so keep them off.
    "person": SubjectPreset("person", "person", ADJECTIVE_TEMPLATES, flip=False, steps_scale=1.25),
    "style": SubjectPreset("style", "style", STYLE_TEMPLATES, flip=True),
}


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


@dataclass(frozen=True)
class FieldInfo:
    """How people see and set one config field. The CLI's ``train`` options are generated from it, and the app's
    hyperparameter form can be: adding a field to :class:`TrainingConfig` is one edit.

    ``label``: a short name (the form's label). ``help``: one line (the CLI's help, the form's info text).
    ``flag``: the CLI option, or None for none. ``form``: shown in the app's hyperparameter form.
    ``minimum``/``maximum``: bounds :meth:`TrainingConfig.validate` checks (``above_minimum``: the minimum itself
    is refused); a form gives them to its widget. ``none_is_off``: None switches the feature off (rather than
    "the method's default"); the CLI takes 0 or ``none`` for it. ``choices``: where the values of a Literal-typed
    field come from when a registry holds them (the method: :func:`personalization.methods.method_keys`), so that
    validation and the CLI offer what is registered; otherwise the Literal's values.
    """

    label: str
    help: str = ""
    flag: str | None = None
    form: bool = False
    minimum: float | None = None
    maximum: float | None = None
    above_minimum: bool = False
    none_is_off: bool = False
    choices: Callable[[], tuple[str, ...]] | None = None


_DERIVED = "default: from the method and the subject type"


@dataclass
class TrainingConfig:
    """Everything a training run needs, validated by :meth:`validate` and completed by :meth:`resolved`.

    Each field says how it is shown and set in its :class:`FieldInfo` (see :func:`config_fields`)."""

    class_noun: str = field(metadata={"info": FieldInfo(
        "Class noun", "what the subject is, e.g. dog, backpack, star", "--class-noun")})
    method: Method = field(default=DEFAULT_METHOD, metadata={"info": FieldInfo(
        "Method", "what is trained", "--method", choices=method_keys)})
    stage2_mode: Stage2Mode | None = field(default=None, metadata={"info": FieldInfo(
        "Stage 2: LoRA or full U-Net", "two_stage U-Net training: full or lora (default: lora; full on the mini "
        "model)", "--stage2-mode")})
    subject_type: SubjectType = field(default="object", metadata={"info": FieldInfo(
        "Subject type", "preset: prompt templates, flips, steps", "--subject-type")})
    base_model: str | None = field(default=None, metadata={"info": FieldInfo(
        "Base model", "Hub id or local diffusers folder (default: SD-1.5 on GPU, mini on CPU)", "--base-model")})
    trigger_token: str | None = field(default=None, metadata={"info": FieldInfo(
        "Trigger", "the new token, e.g. '<my-dog>' (DreamBooth: an identifier like sks)", "--trigger")})
    init_word: str | None = field(default=None, metadata={"info": FieldInfo(
        "Initial word", "word whose embedding starts the trigger (default: the class noun)", "--init-word")})
    resolution: int | None = field(default=None, metadata={"info": FieldInfo(
        "Resolution", "training size in pixels, a multiple of 8 (default: the base model's)", "--resolution",
        minimum=16, maximum=2048)})
    prompt_templates: list[str] | None = field(default=None, metadata={"info": FieldInfo(
        "Prompt templates", "training prompt with {trigger} and {noun} (repeatable; default: the preset's)",
        "--prompt-template")})
    center_crop: bool = field(default=True, metadata={"info": FieldInfo(
        "Center crop", "crop photos to a centred square (off: pad them to a square with their border colour)",
        "--center-crop")})
    flip: bool | None = field(default=None, metadata={"info": FieldInfo(
        "Random flips", "show each photo mirrored half of the time (default: the preset's; off for objects and "
        "people)", "--flip")})

    stage1_steps: int | None = field(default=None, metadata={"info": FieldInfo(
        "Stage 1 / TI steps", f"trigger-embedding steps (two_stage, textual_inversion; {_DERIVED})",
        "--stage1-steps", form=True, minimum=0, maximum=100_000)})
    stage1_learning_rate: float | None = field(default=None, metadata={"info": FieldInfo(
        "Stage 1 / TI learning rate", f"learning rate of the trigger embedding ({_DERIVED})", "--stage1-lr",
        form=True, minimum=0.0, maximum=1.0)})
    stage1_weight_decay: float = field(default=0.0, metadata={"info": FieldInfo(
        "Stage 1 weight decay", "AdamW weight decay of the trigger embedding", "--stage1-weight-decay",
        minimum=0.0, maximum=1.0)})
    stage2_steps: int | None = field(default=None, metadata={"info": FieldInfo(
        "U-Net steps", f"U-Net steps (two_stage stage 2, DreamBooth; {_DERIVED})", "--stage2-steps", form=True,
        minimum=0, maximum=100_000)})
    stage2_learning_rate: float | None = field(default=None, metadata={"info": FieldInfo(
        "U-Net learning rate", f"learning rate of the U-Net ({_DERIVED} and the stage 2 mode)", "--stage2-lr",
        form=True, minimum=0.0, maximum=1.0)})
    max_batch_size: int = field(default=4, metadata={"info": FieldInfo(
        "Images per step", "subject images per step, at most this many (all of them when fewer)", "--batch-size",
        form=True, minimum=1, maximum=64)})
    snr_gamma: float | None = field(default=5.0, metadata={"info": FieldInfo(
        "Min-SNR gamma", "min-SNR loss weighting gamma; 0 or none: off (plain MSE, as in diffusers' scripts)",
        "--snr-gamma", minimum=0.0, maximum=100.0, above_minimum=True, none_is_off=True)})
    max_grad_norm: float = field(default=1.0, metadata={"info": FieldInfo(
        "Gradient clipping", "clip gradients to this norm", "--max-grad-norm", minimum=0.0, maximum=1e6,
        above_minimum=True)})

    lora_rank: int = field(default=16, metadata={"info": FieldInfo(
        "LoRA rank", "rank of the U-Net LoRA (LoRA modes)", "--lora-rank", form=True, minimum=1, maximum=512)})
    lora_alpha: int | None = field(default=None, metadata={"info": FieldInfo(
        "LoRA alpha", "LoRA alpha (default: the rank, a scale of 1)", "--lora-alpha", minimum=1, maximum=4096)})

    prior_preservation: bool = field(default=False, metadata={"info": FieldInfo(
        "DreamBooth: prior preservation (class images)", "DreamBooth: regularize with class images",
        "--prior-preservation", form=True)})
    class_images: int = field(default=100, metadata={"info": FieldInfo(
        "Class images", "number of prior-preservation images", "--class-images", form=True, minimum=1,
        maximum=2000)})
    class_prompt: str | None = field(default=None, metadata={"info": FieldInfo(
        "Class prompt", "prompt of the class images (default: 'a photo of a <class noun>')", "--class-prompt")})
    prior_loss_weight: float = field(default=1.0, metadata={"info": FieldInfo(
        "Prior loss weight", "weight of the class images' loss (prior preservation)", "--prior-loss-weight",
        minimum=0.0, maximum=100.0)})
    train_text_encoder: bool = field(default=False, metadata={"info": FieldInfo(
        "DreamBooth: train the text encoder", "DreamBooth: also train the text encoder", "--train-text-encoder",
        form=True)})

    seed: int = field(default=0, metadata={"info": FieldInfo(
        "Seed", "seed of the run", "--seed", form=True, minimum=0, maximum=2**32 - 1)})
    mixed_precision: MixedPrecision = field(default="auto", metadata={"info": FieldInfo(
        "Mixed precision", "auto: bf16 on GPUs that have it, else fp16; fp32 on CPU", "--mixed-precision")})
    gradient_checkpointing: bool = field(default=False, metadata={"info": FieldInfo(
        "Gradient checkpointing (less memory; on by itself on small GPUs)",
        "less memory, slower steps (switched on by itself on small GPUs)", "--gradient-checkpointing", form=True)})
    use_8bit_adam: bool = field(default=False, metadata={"info": FieldInfo(
        "8-bit Adam (less memory; on by itself on small GPUs)",
        "8-bit AdamW from bitsandbytes: less memory (switched on by itself on small GPUs)", "--use-8bit-adam",
        form=True)})
    compile_unet: bool = field(default=False, metadata={"info": FieldInfo(
        "Compile the U-Net (GPU: faster steps after a warm-up)",
        "torch.compile the U-Net's transformer blocks (regional): faster steps after a warm-up", "--compile-unet",
        form=True)})

    validation_prompts: list[str] = field(default_factory=list, metadata={"info": FieldInfo(
        "Sample prompts", "prompt for the sample images (repeatable)", "--validation-prompt")})
    preview_interval: int = field(default=0, metadata={"info": FieldInfo(
        "Preview every N steps (0: off)", "render a preview every N steps (0: never)", "--preview-interval",
        form=True, minimum=0, maximum=100_000)})
    sample_count: int = field(default=4, metadata={"info": FieldInfo(
        "Sample images", "sample images written to samples/", "--samples", minimum=0, maximum=16)})
    sample_steps: int = field(default=GENERATION_DEFAULTS.steps, metadata={"info": FieldInfo(
        "Sample steps", "denoising steps of the sample and preview images", "--sample-steps", minimum=1,
        maximum=GENERATION_DEFAULTS.max_steps)})
    guidance_scale: float = field(default=GENERATION_DEFAULTS.guidance_scale, metadata={"info": FieldInfo(
        "Sample guidance", "guidance scale of the sample, preview and class images", "--guidance", minimum=0.0,
        maximum=GENERATION_DEFAULTS.max_guidance_scale)})

    checkpoints: int = field(default=4, metadata={"info": FieldInfo(
        "Checkpoints", "checkpoints spread over the last stage (plus the end of two-stage's stage 1), each with "
        "samples and scores; 0: the last step only", "--checkpoints", form=True, minimum=0, maximum=20)})
    keep_step: str = field(default="best", metadata={"info": FieldInfo(
        "Kept step", "the checkpoint the folder holds: best (the recommended one), last, or a step number",
        "--keep-step")})
    score_checkpoints: bool = field(default=True, metadata={"info": FieldInfo(
        "Score checkpoints", "score each checkpoint against the photos and the base model (the mini world's "
        "checker) and recommend one", "--score-checkpoints")})

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> Self:
        """Raise :class:`ConfigError` naming the first invalid field; return self so calls can chain."""
        for spec in CONFIG_FIELDS:
            value = getattr(self, spec.name)
            if value is None and spec.optional:
                continue
            if spec.choices:
                _check_choice(spec.name, value, spec.choices)
            elif spec.info.minimum is not None and spec.info.maximum is not None:
                if spec.kind is int:
                    _check_int(spec.name, value, int(spec.info.minimum), int(spec.info.maximum))
                else:
                    _check_float(spec.name, value, spec.info.minimum, spec.info.maximum, spec.info.above_minimum)
        noun = self.class_noun.strip() if isinstance(self.class_noun, str) else ""
        if not re.fullmatch(r"[A-Za-z][A-Za-z \-]{0,39}", noun):
            raise ConfigError(
                f"class_noun must be a plain word such as 'dog' (letters, spaces, hyphens; at most 40), "
                f"got {self.class_noun!r}"
            )
        if self.init_word is not None and not re.fullmatch(r"[A-Za-z][A-Za-z\-]{0,39}", self.init_word.strip()):
            raise ConfigError(f"init_word must be a single plain word, got {self.init_word!r}")
        if self.trigger_token is not None and (not self.trigger_token.strip() or re.search(r"\s", self.trigger_token)):
            raise ConfigError(f"trigger_token must be one word without spaces, got {self.trigger_token!r}")
        if not isinstance(self.keep_step, str) or not (self.keep_step in ("best", "last") or
                                                        re.fullmatch(r"[1-9][0-9]{0,6}", self.keep_step)):
            raise ConfigError(f"keep_step must be best, last or a step number, got {self.keep_step!r}")
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        if self.prompt_templates is not None:
            if not self.prompt_templates:
                raise ConfigError("prompt_templates must hold at least one template")
            for template in self.prompt_templates:
                if "{trigger}" not in template or "{noun}" not in template:
                    raise ConfigError(f"prompt_templates entries need {{trigger}} and {{noun}}, got {template!r}")
        prompts = self.validation_prompts
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("validation_prompts must be a list of strings")
        for option in OPTIONS:  # the options only some methods take: the method's spec says which
            refusal = self.method_spec.refusal(option) if getattr(self, option) else None
            if refusal:
                raise ConfigError(refusal)
        return self

    # ---- defaults ---------------------------------------------------------------------------------------------
    @property
    def preset(self) -> SubjectPreset:
        return PRESETS[self.subject_type]

    @property
    def method_spec(self) -> MethodSpec:
        """The registry's spec of :attr:`method` (:mod:`personalization.methods`)."""
        return method_spec(self.method)

    @property
    def learns_token(self) -> bool:
        """Whether the method learns a new trigger embedding (and so writes learned_embeds.safetensors)."""
        return self.method_spec.learns_token

    @property
    def uses_lora(self) -> bool:
        spec = self.method_spec
        return spec.trains_unet and spec.stage2_mode(self.default_stage2_mode()) == "lora"

    @property
    def on_mini_world(self) -> bool:
        return is_mini_world_model(self.base_model)

    def default_stage2_mode(self) -> str:
        """The set mode, else LoRA (SD-size models: memory and a few-MB artifact), or the full U-Net on the mini
        model, where it measured clearly better (benchmarks/quality.py, README)."""
        if self.stage2_mode is not None:
            return self.stage2_mode
        return "full" if self.on_mini_world else "lora"

    @property
    def trains_unet(self) -> bool:
        return self.method_spec.trains_unet

    def resolved(self) -> ResolvedConfig:
        """A validated copy with every ``None`` default filled in from the method and the subject preset."""
        self.validate()
        values = dataclasses.asdict(self)
        spec = self.method_spec
        defaults = dataclasses.asdict(spec.defaults)
        scale = self.preset.steps_scale
        for name in ("stage1_steps", "stage2_steps"):
            if values[name] is None:
                values[name] = round(defaults[name] * scale)
        values["stage2_mode"] = spec.stage2_mode(self.default_stage2_mode())
        if values["stage1_learning_rate"] is None:
            values["stage1_learning_rate"] = defaults["stage1_learning_rate"]
        if values["stage2_learning_rate"] is None:
            method_rate = defaults["stage2_learning_rate"]
            mode_rate = STAGE2_LEARNING_RATES[values["stage2_mode"]]
            values["stage2_learning_rate"] = mode_rate if method_rate is None else method_rate
            if self.on_mini_world and spec.trains_unet:
                # A 12.6 M-parameter U-Net needs far larger steps than SD-1.5's 860 M (measured on the mini world).
                values["stage2_learning_rate"] = MINI_WORLD_UNET_LEARNING_RATES[values["stage2_mode"]]
                if values["stage2_mode"] == "full" and defaults["mini_world_full_unet_learning_rate"] is not None:
                    values["stage2_learning_rate"] = defaults["mini_world_full_unet_learning_rate"]
        values["class_noun"] = self.class_noun.strip().lower()
        if values["init_word"] is None:
            values["init_word"] = values["class_noun"].split()[-1]
        if values["trigger_token"] is None:
            learned = default_trigger(values["class_noun"])
            values["trigger_token"] = learned if spec.learns_token else DEFAULT_IDENTIFIER
        if values["lora_alpha"] is None:
            # alpha == rank keeps the LoRA scale at 1, so a loader that ignores metadata still reproduces it.
            values["lora_alpha"] = self.lora_rank
        if values["flip"] is None:
            values["flip"] = self.preset.flip
        if values["prompt_templates"] is None:
            templates = MINI_WORLD_TEMPLATES if self.on_mini_world else self.preset.prompt_templates
            values["prompt_templates"] = list(templates)
        if values["class_prompt"] is None:
            values["class_prompt"] = f"a photo of a {values['class_noun']}"
        if not spec.trains_unet:
            values["stage2_steps"] = 0  # e.g. textual inversion never touches the U-Net
        if not spec.learns_token:
            values["stage1_steps"] = 0  # e.g. DreamBooth learns no embedding
        if values["stage1_steps"] == 0 and values["stage2_steps"] == 0:
            raise ConfigError("stage1_steps and stage2_steps are both 0: nothing would be trained")
        if spec.learns_token and values["stage1_steps"] == 0:
            raise ConfigError(f"stage1_steps must be at least 1 for {self.method} (stage 1 learns the trigger)")
        return ResolvedConfig(**values).validate()

    # ---- instance prompt --------------------------------------------------------------------------------------
    def instance_prompt(self) -> str:
        """The trigger phrase people type: the trigger as an adjective before the class noun."""
        return instance_phrase(self.trigger_token or default_trigger(self.class_noun), self.class_noun,
                               self.subject_type)

    def sample_prompts(self) -> list[str]:
        """Prompts for the samples (sample i: prompt i, cycling, seed + i): the user's, else the subject in new
        places, one context per sample. The Train tab's grid and the card's widget show these, so what a user sees
        after training is what the card shows. Never empty: the trainer's preview draws the first."""
        if self.validation_prompts:
            return list(self.validation_prompts)
        contexts = self.context_prompts()
        return [contexts[index % len(contexts)] for index in range(max(self.sample_count, 1))]

    def context_prompts(self) -> list[str]:
        """The subject in new places, in words the base model knows: backgrounds of the shapes world on the mini
        model (it learned nothing else), scenes on Stable Diffusion. What the app, the card and the CLI suggest."""
        phrase = self.instance_prompt()
        if self.on_mini_world:
            return [f"{phrase} on a {colour} background" for colour in MINI_WORLD_BACKGROUNDS]
        return [f"{phrase} on the beach", f"a watercolor painting of a {self.trigger_token} {self.class_noun}",
                f"{phrase} in the snow", f"{phrase} on a cobblestone street"]

    # ---- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        if "class_noun" not in values:
            raise ConfigError("class_noun is required")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: Path) -> Self:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read config file {Path(path).name}: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"config file {Path(path).name} must hold a JSON object")
        return cls.from_dict(values)


@dataclass(kw_only=True)
class ResolvedConfig(TrainingConfig):
    """A config after :meth:`TrainingConfig.resolved`: every default filled in, nothing left to guess.

    What the trainer, the recipes, the card and the estimates read. Only three fields may still be None:
    ``base_model`` and ``resolution`` (the trainer fills them from the machine and the base model's files before it
    trains, and the saved ``training_config.json`` holds both) and ``snr_gamma`` (None: min-SNR weighting off).
    """

    stage2_mode: Stage2Mode = field()
    trigger_token: str = field()
    init_word: str = field()
    prompt_templates: list[str] = field()
    flip: bool = field()
    stage1_steps: int = field()
    stage1_learning_rate: float = field()
    stage2_steps: int = field()
    stage2_learning_rate: float = field()
    lora_alpha: int = field()
    class_prompt: str = field()

    def __post_init__(self) -> None:
        missing = [name for name in ResolvedConfig.__annotations__ if getattr(self, name) is None]
        if missing:
            raise ConfigError(f"a resolved config needs {', '.join(missing)}; use TrainingConfig(...).resolved()")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResolvedConfig:
        """A saved ``training_config.json`` (or any config dict), resolved: an older file without a newer field
        gets that field's default."""
        return TrainingConfig.from_dict(values).resolved()


@dataclass(frozen=True)
class ConfigField:
    """One user-settable field of :class:`TrainingConfig`, described for generated interfaces (CLI, forms).

    ``kind``: int, float, bool, str or list (of strings). ``optional``: None is allowed (the method's or preset's
    default when resolved, or "off" where ``info.none_is_off``). ``literal``: the values its Literal type lists.
    ``default``: the field's default (None: derived when resolved).
    """

    name: str
    kind: type
    optional: bool
    literal: tuple[str, ...]
    default: Any
    info: FieldInfo

    @property
    def choices(self) -> tuple[str, ...]:
        """The values a Literal-typed field takes, read when asked: its registry's (``info.choices``: the methods
        registered now), else its Literal's; () for other fields."""
        return self.info.choices() if self.info.choices else self.literal

    def coerce(self, value: Any) -> Any:
        """A form's value as the field takes it: numbers as int or float, "" or None as None for optional fields."""
        if value is None or (value == "" and self.optional):
            return None
        if self.kind is bool:
            return bool(value)
        if self.kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


def _describe_fields(cls: type) -> tuple[ConfigField, ...]:
    hints = typing.get_type_hints(cls)
    described = []
    for spec in dataclasses.fields(cls):
        hint, optional = hints[spec.name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            hint, optional = args[0], len(args) < len(typing.get_args(hint))
        choices: tuple[str, ...] = ()
        if typing.get_origin(hint) is Literal:
            kind, choices = str, typing.get_args(hint)
        else:
            kind = typing.get_origin(hint) or hint
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = dataclasses.MISSING
        described.append(ConfigField(spec.name, kind, optional, choices, default, spec.metadata["info"]))
    return tuple(described)


CONFIG_FIELDS: tuple[ConfigField, ...] = _describe_fields(TrainingConfig)


def config_fields() -> tuple[ConfigField, ...]:
    """Every field of :class:`TrainingConfig` with its type and :class:`FieldInfo`, in declaration order."""
    return CONFIG_FIELDS


def form_fields() -> tuple[ConfigField, ...]:
    """The fields of the app's hyperparameter form (``FieldInfo.form``), in declaration order."""
    return tuple(spec for spec in CONFIG_FIELDS if spec.info.form)


def mini_world_info(base_model: str | None) -> dict[str, Any] | None:
    """The training info of a local folder holding a mini-world model; None for anything else (Hub ids too)."""
    if not base_model:
        return None
    try:
        info = json.loads((Path(base_model).expanduser() / MINI_WORLD_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no such folder or file, or not JSON: not a mini-world model
        return None
    return info if isinstance(info, dict) and info.get("world") == MINI_WORLD_NAME else None


def is_mini_world_model(base_model: str | None) -> bool:
    """Whether the mini-world recipe applies: the bundled name, or a folder (by any path, a copy, a retrained model)
    whose training info names the world. A folder is judged by its content, never by how its path is spelled."""
    return base_model == BUNDLED_MINI_MODEL or mini_world_info(base_model) is not None


def instance_phrase(trigger: str, class_noun: str, subject_type: str) -> str:
    """The trigger as an adjective before the class noun ("a photo of a <my-dog> dog"); styles read "in <t> style"."""
    if subject_type == "style":
        return f"a painting in {trigger} {class_noun}"
    return f"a photo of a {trigger} {class_noun}"


def default_trigger(class_noun: str) -> str:
    """A readable trigger that is never a vocabulary word: ``<my-dog>``-style, from the class noun."""
    slug = re.sub(r"[^a-z0-9]+", "-", class_noun.strip().lower()).strip("-") or "subject"
    return f"<my-{slug}>"


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")


def _check_float(name: str, value: object, low: float, high: float, exclusive_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if exclusive_low else value < low
    if too_low or value > high or value != value:
        bound = f"greater than {low}" if exclusive_low else f"at least {low}"
        raise ConfigError(f"{name} must be {bound} and at most {high}, got {value}")
