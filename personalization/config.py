"""The one validated settings object for a training run, shared by the CLI, the app and the benchmarks.

Fields left as ``None`` take the method's (and subject preset's) default when the config is resolved, so the saved
``training_config.json`` always records the numbers that were actually used.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Method = Literal["two_stage", "textual_inversion", "dreambooth", "dreambooth_lora"]
Stage2Mode = Literal["full", "lora"]
SubjectType = Literal["object", "pet", "person", "style"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]

METHODS: tuple[str, ...] = ("two_stage", "textual_inversion", "dreambooth", "dreambooth_lora")
STAGE2_MODES: tuple[str, ...] = ("full", "lora")
SUBJECT_TYPES: tuple[str, ...] = ("object", "pet", "person", "style")
MIXED_PRECISIONS: tuple[str, ...] = ("auto", "no", "fp16", "bf16")

MAX_SUBJECT_IMAGES = 50

# Starting points from common practice (docs/measurements.md#starting-hyperparameters); the benchmarks decide the final
# ones.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "two_stage": {"stage1_steps": 400, "stage1_learning_rate": 5e-3, "stage2_steps": 300, "stage2_learning_rate": None},
    "textual_inversion": {"stage1_steps": 3000, "stage1_learning_rate": 5e-4, "stage2_steps": 0,
                          "stage2_learning_rate": 0.0},
    "dreambooth": {"stage1_steps": 0, "stage1_learning_rate": 0.0, "stage2_steps": 800, "stage2_learning_rate": 5e-6},
    "dreambooth_lora": {"stage1_steps": 0, "stage1_learning_rate": 0.0, "stage2_steps": 800,
                        "stage2_learning_rate": 1e-4},
}
STAGE2_LEARNING_RATES: dict[str, float] = {"full": 2e-6, "lora": 1e-4}
MINI_WORLD_UNET_LEARNING_RATES: dict[str, float] = {"full": 1e-4, "lora": 1e-3}

# DreamBooth's identifier: an existing rare token whose prior is weak, as in the DreamBooth paper.
DEFAULT_IDENTIFIER = "sks"

# The mini world's name: its models say so in training_info.json (scripts/train_mini_model.py writes it), which is
# how a folder is recognized by what it is, wherever it lives.
MINI_WORLD_NAME = "mini-shapes"
MINI_WORLD_INFO_FILE = "training_info.json"
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


@dataclass
class TrainingConfig:
    """Everything a training run needs, validated by :meth:`validate` and completed by :meth:`resolved`."""

    class_noun: str
    method: str = "two_stage"
    stage2_mode: str | None = None
    subject_type: str = "object"
    base_model: str | None = None
    trigger_token: str | None = None
    init_word: str | None = None
    resolution: int | None = None
    prompt_templates: list[str] | None = None
    center_crop: bool = True
    flip: bool | None = None

    stage1_steps: int | None = None
    stage1_learning_rate: float | None = None
    stage1_weight_decay: float = 0.0
    stage2_steps: int | None = None
    stage2_learning_rate: float | None = None
    max_batch_size: int = 4
    snr_gamma: float | None = 5.0
    max_grad_norm: float = 1.0

    lora_rank: int = 16
    lora_alpha: int | None = None

    prior_preservation: bool = False
    class_images: int = 100
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False

    seed: int = 0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    compile_unet: bool = False

    validation_prompts: list[str] = field(default_factory=list)
    preview_interval: int = 0
    sample_count: int = 4
    sample_steps: int = 25
    guidance_scale: float = 5.0

    # ---- validation -------------------------------------------------------------------------------------------
    def validate(self) -> TrainingConfig:
        """Raise :class:`ConfigError` naming the first invalid field; return self so calls can chain."""
        _check_choice("method", self.method, METHODS)
        if self.stage2_mode is not None:
            _check_choice("stage2_mode", self.stage2_mode, STAGE2_MODES)
        _check_choice("subject_type", self.subject_type, SUBJECT_TYPES)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
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
        if self.resolution is not None:
            _check_int("resolution", self.resolution, 16, 2048)
            if self.resolution % 8:
                raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")
        for name in ("stage1_steps", "stage2_steps"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 0, 100_000)
        for name in ("stage1_learning_rate", "stage2_learning_rate"):
            value = getattr(self, name)
            if value is not None:
                _check_float(name, value, 0.0, 1.0)
        _check_float("stage1_weight_decay", self.stage1_weight_decay, 0.0, 1.0)
        _check_int("max_batch_size", self.max_batch_size, 1, 64)
        if self.snr_gamma is not None:
            _check_float("snr_gamma", self.snr_gamma, 0.0, 100.0, exclusive_low=True)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, 1e6, exclusive_low=True)
        _check_int("lora_rank", self.lora_rank, 1, 512)
        if self.lora_alpha is not None:
            _check_int("lora_alpha", self.lora_alpha, 1, 4096)
        _check_int("class_images", self.class_images, 1, 2000)
        _check_float("prior_loss_weight", self.prior_loss_weight, 0.0, 100.0)
        _check_int("seed", self.seed, 0, 2**32 - 1)
        _check_int("preview_interval", self.preview_interval, 0, 100_000)
        _check_int("sample_count", self.sample_count, 0, 16)
        _check_int("sample_steps", self.sample_steps, 1, 200)
        _check_float("guidance_scale", self.guidance_scale, 0.0, 50.0)
        if self.prompt_templates is not None:
            if not self.prompt_templates:
                raise ConfigError("prompt_templates must hold at least one template")
            for template in self.prompt_templates:
                if "{trigger}" not in template or "{noun}" not in template:
                    raise ConfigError(f"prompt_templates entries need {{trigger}} and {{noun}}, got {template!r}")
        prompts = self.validation_prompts
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("validation_prompts must be a list of strings")
        if self.prior_preservation and self.method not in ("dreambooth", "dreambooth_lora"):
            raise ConfigError(
                f"prior_preservation is a DreamBooth option; method {self.method!r} trains without class images"
            )
        if self.train_text_encoder and self.method not in ("dreambooth", "dreambooth_lora"):
            raise ConfigError(
                f"train_text_encoder is a DreamBooth option; method {self.method!r} keeps the text encoder frozen"
            )
        if self.train_text_encoder and self.method == "dreambooth_lora":
            # transformers 5 loads text-encoder LoRA only with peft >= 0.22, which is not released for these pins:
            # a pushed text-encoder LoRA would not load in plain diffusers.
            raise ConfigError(
                "train_text_encoder is not available with dreambooth_lora (text-encoder LoRA would not load in "
                "diffusers with peft 0.21); use method 'dreambooth' to train the text encoder"
            )
        return self

    # ---- defaults ---------------------------------------------------------------------------------------------
    @property
    def preset(self) -> SubjectPreset:
        return PRESETS[self.subject_type]

    @property
    def learns_token(self) -> bool:
        """Whether the method learns a new trigger embedding (and so writes learned_embeds.safetensors)."""
        return self.method in ("two_stage", "textual_inversion")

    @property
    def uses_lora(self) -> bool:
        return self.method == "dreambooth_lora" or (self.method == "two_stage" and self.default_stage2_mode() == "lora")

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
        return self.method != "textual_inversion"

    def resolved(self) -> TrainingConfig:
        """A validated copy with every ``None`` default filled in from the method and the subject preset."""
        self.validate()
        values = dataclasses.asdict(self)
        defaults = METHOD_DEFAULTS[self.method]
        scale = self.preset.steps_scale
        for name in ("stage1_steps", "stage2_steps"):
            if values[name] is None:
                values[name] = round(defaults[name] * scale)
        if self.method == "two_stage":
            values["stage2_mode"] = self.default_stage2_mode()
        else:
            values["stage2_mode"] = "lora" if self.method == "dreambooth_lora" else "full"
        if values["stage1_learning_rate"] is None:
            values["stage1_learning_rate"] = defaults["stage1_learning_rate"]
        if values["stage2_learning_rate"] is None:
            method_rate = defaults["stage2_learning_rate"]
            mode_rate = STAGE2_LEARNING_RATES[values["stage2_mode"]]
            values["stage2_learning_rate"] = mode_rate if method_rate is None else method_rate
            if self.on_mini_world and self.method != "textual_inversion":
                # A 12.6 M-parameter U-Net needs far larger steps than SD-1.5's 860 M (measured on the mini world).
                values["stage2_learning_rate"] = MINI_WORLD_UNET_LEARNING_RATES[values["stage2_mode"]]
        values["class_noun"] = self.class_noun.strip().lower()
        if values["init_word"] is None:
            values["init_word"] = values["class_noun"].split()[-1]
        if values["trigger_token"] is None:
            learned = default_trigger(values["class_noun"])
            values["trigger_token"] = learned if self.learns_token else DEFAULT_IDENTIFIER
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
        if self.method == "textual_inversion":
            values["stage2_steps"] = 0  # TI never touches the U-Net
        if self.method in ("dreambooth", "dreambooth_lora"):
            values["stage1_steps"] = 0  # DreamBooth learns no embedding
        if values["stage1_steps"] == 0 and values["stage2_steps"] == 0:
            raise ConfigError("stage1_steps and stage2_steps are both 0: nothing would be trained")
        if self.method == "two_stage" and values["stage1_steps"] == 0:
            raise ConfigError("stage1_steps must be at least 1 for two_stage (stage 1 learns the trigger)")
        return TrainingConfig(**values).validate()

    # ---- instance prompt --------------------------------------------------------------------------------------
    def instance_prompt(self) -> str:
        """The trigger phrase people type: the trigger as an adjective before the class noun."""
        return instance_phrase(self.trigger_token or default_trigger(self.class_noun), self.class_noun,
                               self.subject_type)

    def sample_prompts(self) -> list[str]:
        """Prompts for the samples on the card: the user's, else the trigger phrase and two new contexts."""
        if self.validation_prompts:
            return list(self.validation_prompts)
        phrase = self.instance_prompt()
        if self.on_mini_world:
            return [phrase, f"{phrase} on a blue background", f"{phrase} on a green background"]
        return [phrase, f"{phrase} on the beach", f"a watercolor painting of a {self.trigger_token} {self.class_noun}"]

    # ---- serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        if "class_noun" not in values:
            raise ConfigError("class_noun is required")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: Path) -> TrainingConfig:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read config file {Path(path).name}: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"config file {Path(path).name} must hold a JSON object")
        return cls.from_dict(values)


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
