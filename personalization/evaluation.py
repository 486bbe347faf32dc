"""Evaluation of a personalized model, as in the DreamBooth paper: CLIP-I, CLIP-T, DINO, plus a drift score.

- CLIP-I: mean cosine similarity of CLIP image embeddings, generated vs reference images (subject fidelity).
- CLIP-T: mean cosine similarity of CLIP image and text embeddings, generated image vs its prompt *without* the
  trigger (prompt fidelity).
- DINO: mean cosine similarity of DINO ViT-S/16 CLS features, generated vs reference (subject fidelity that, unlike
  CLIP, separates instances of the same class).
- drift: class prompts without the trigger, personalized vs base model with the same seeds: 1 - mean DINO similarity
  of each pair (0 = the model still draws the class as before; higher = the subject leaked into the class).

Feature models are loaded by Hub id (real weights) or from a local folder (tests build tiny random ones).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .tokens import strip_trigger

CLIP_MODEL_ID = "openai/clip-vit-base-patch32"
DINO_MODEL_ID = "facebook/dino-vits16"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The DreamBooth paper's evaluation prompts ({} is "<trigger> <class>" or "<class>").
OBJECT_PROMPTS = (
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest", "a {} with a wheat field in the background",
    "a {} with a tree and autumn leaves in the background", "a {} with the Eiffel Tower in the background",
    "a {} floating on top of water", "a {} floating in an ocean of milk",
    "a {} on top of green grass with sunflowers around it", "a {} on top of a mirror",
    "a {} on top of the sidewalk in a crowded street", "a {} on top of a dirt road", "a {} on top of a white rug",
    "a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}",
)
LIVE_PROMPTS = (
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest", "a {} wearing a red hat", "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf", "a {} wearing a black top hat and a monocle", "a {} in a chef outfit",
    "a {} in a firefighter outfit", "a {} in a police outfit", "a {} wearing pink glasses",
    "a {} wearing a yellow shirt", "a {} in a purple wizard outfit", "a red {}", "a purple {}", "a shiny {}",
    "a wet {}", "a cube shaped {}",
)


def prompt_list(kind: str) -> tuple[str, ...]:
    """The DreamBooth list for ``object`` or ``live`` subjects."""
    if kind not in ("object", "live"):
        raise ValueError(f"prompt list must be 'object' or 'live', got {kind!r}")
    return OBJECT_PROMPTS if kind == "object" else LIVE_PROMPTS


def _pixels(images: Sequence[Image.Image], size: int, resize_to: int, mean: tuple, std: tuple) -> torch.Tensor:
    """Resize the short side, center-crop, normalize: the preprocessing both feature models were trained with."""
    batch = []
    for image in images:
        image = image.convert("RGB")
        scale = resize_to / min(image.size)
        resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                               Image.Resampling.BICUBIC)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        batch.append((array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32))
    return torch.from_numpy(np.stack(batch).transpose(0, 3, 1, 2).copy())


def _normalize(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=-1, keepdim=True).clamp(min=1e-12)


class FeatureModels:
    """CLIP and DINO feature extractors, loaded once."""

    def __init__(self, clip_model: str = CLIP_MODEL_ID, dino_model: str = DINO_MODEL_ID,
                 device: torch.device | None = None, *, local_files_only: bool = False) -> None:
        from transformers import CLIPModel, CLIPTokenizer, ViTModel

        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        local = {"local_files_only": local_files_only}
        self.clip = CLIPModel.from_pretrained(clip_model, **local).eval().to(self.device)
        self.clip_tokenizer = CLIPTokenizer.from_pretrained(clip_model, **local)
        self.dino = ViTModel.from_pretrained(dino_model, add_pooling_layer=False, **local).eval().to(self.device)
        self.clip_size = int(self.clip.config.vision_config.image_size)
        self.dino_size = int(self.dino.config.image_size)

    @torch.no_grad()
    def clip_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = _pixels(images, self.clip_size, self.clip_size, CLIP_MEAN, CLIP_STD).to(self.device)
        return _normalize(_as_tensor(self.clip.get_image_features(pixel_values=pixels)).float())

    @torch.no_grad()
    def clip_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.clip_tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _normalize(_as_tensor(self.clip.get_text_features(**tokens)).float())

    @torch.no_grad()
    def dino_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        resize = round(self.dino_size * 256 / 224)
        pixels = _pixels(images, self.dino_size, resize, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        return _normalize(self.dino(pixel_values=pixels).last_hidden_state[:, 0].float())


def _as_tensor(output: object) -> torch.Tensor:
    """transformers 5 may return a model output object where 4.x returned the pooled tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected feature output {type(output).__name__}")


def clip_i(models: FeatureModels, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """Mean pairwise cosine similarity of CLIP image embeddings (generated x references)."""
    return float((models.clip_image(generated) @ models.clip_image(references).T).mean())


def dino(models: FeatureModels, generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> float:
    """Mean pairwise cosine similarity of DINO CLS features (generated x references)."""
    return float((models.dino_image(generated) @ models.dino_image(references).T).mean())


def clip_t(models: FeatureModels, generated: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Mean cosine similarity of each generated image with its own prompt."""
    if len(generated) != len(prompts):
        raise ValueError(f"{len(generated)} images for {len(prompts)} prompts")
    return float((models.clip_image(generated) * models.clip_text(prompts)).sum(dim=-1).mean())


def drift(models: FeatureModels, personalized: Sequence[Image.Image], base: Sequence[Image.Image]) -> float:
    """1 - mean DINO similarity of same-seed pairs (personalized vs base) for class prompts without the trigger."""
    if len(personalized) != len(base):
        raise ValueError(f"{len(personalized)} personalized images for {len(base)} base images")
    pairs = (models.dino_image(personalized) * models.dino_image(base)).sum(dim=-1)
    return float(1.0 - pairs.mean())


@dataclass
class EvaluationReport:
    clip_i: float
    clip_t: float
    dino: float
    drift: float
    prompts: int
    images_per_prompt: int
    details: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def as_dict(self) -> dict[str, float]:
        """The checkpoint table's scores: fidelity is DINO."""
        scores = {"fidelity": self.dino, "drift": self.drift, "clip_i": self.clip_i, "clip_t": self.clip_t,
                  "dino": self.dino}
        if "base_dino" in self.details:
            scores["base_fidelity"] = self.details["base_dino"]
        return scores

    def table(self) -> str:
        return ("| CLIP-I | CLIP-T | DINO | drift | prompts x images |\n|---|---|---|---|---|\n"
                f"| {self.clip_i:.3f} | {self.clip_t:.3f} | {self.dino:.3f} | {self.drift:.3f} | "
                f"{self.prompts} x {self.images_per_prompt} |")


def evaluate_artifact(
    artifact: Path, references: Sequence[Image.Image], *, prompt_kind: str = "object", seeds: int = 1,
    steps: int = 25, guidance_scale: float = 5.0, base_model: str | None = None, models: FeatureModels | None = None,
    generator: object | None = None, max_prompts: int | None = None,
) -> EvaluationReport:
    """Generate the DreamBooth prompt list with and without personalization and score it."""
    from .generation import GenerationRequest, Generator

    models = models or FeatureModels()
    generator = generator or Generator()
    info = generator.apply(artifact, base_model=base_model)
    subject = f"{info.trigger_token} {info.class_noun}".strip()
    templates = prompt_list(prompt_kind)[: max_prompts or None]
    personalized, personalized_prompts, drift_personal, drift_base = [], [], [], []
    resolution = info.config.get("resolution")
    for template in templates:
        prompt = template.format(subject)
        class_prompt = template.format(info.class_noun)
        for seed in range(seeds):
            request = GenerationRequest(prompt=prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                        resolution=resolution)
            personalized += generator.generate(request)
            personalized_prompts.append(strip_trigger(prompt, info.trigger_token))
            class_request = GenerationRequest(prompt=class_prompt, seed=seed, steps=steps,
                                              guidance_scale=guidance_scale, resolution=resolution)
            drift_personal += generator.generate(class_request)
            drift_base += generator.generate(class_request, personalized=False)
    return EvaluationReport(
        clip_i=clip_i(models, personalized, references),
        clip_t=clip_t(models, personalized, personalized_prompts),
        dino=dino(models, personalized, references),
        drift=drift(models, drift_personal, drift_base),
        prompts=len(templates),
        images_per_prompt=seeds,
    )


class FeatureScorer:
    """Checkpoint scores on real base models (:mod:`personalization.checkpoints`): fidelity is DINO of trigger
    prompts against the references (the metric that separates instances of one class), with CLIP-I and CLIP-T beside
    it; drift is :func:`drift` on class prompts without the trigger, against the base model with the same seeds.

    The probes are the first ``prompts`` of the DreamBooth list for the subject's kind, one seed each.
    """

    name = "CLIP / DINO feature scorer"
    # Unmeasured: DINO drift (1 - same-seed similarity) that still reads as the same class; to be set from a GPU run.
    drift_tolerance = 0.15

    def __init__(self, models: FeatureModels, references: Sequence[Image.Image], trigger_token: str,
                 class_noun: str, *, kind: str = "object", prompts: int = 6) -> None:
        self.models, self.references = models, list(references)
        templates = prompt_list(kind)[:prompts]
        self.trigger_prompts = [template.format(f"{trigger_token} {class_noun}") for template in templates]
        self.plain_prompts = [strip_trigger(prompt, trigger_token) for prompt in self.trigger_prompts]
        self.class_prompts = [template.format(class_noun) for template in templates]
        self.seeds = list(range(len(templates)))
        self.base_class: list[Image.Image] | None = None
        self.base_dino = 0.0

    def prepare(self, render_base) -> None:  # render_base: (prompts, seeds) -> images
        self.base_class = render_base(self.class_prompts, self.seeds)
        self.base_dino = dino(self.models, self.base_class, self.references)  # the base model's fidelity, once

    def score(self, render) -> EvaluationReport:
        if self.base_class is None:
            raise RuntimeError("FeatureScorer.prepare must render the base model's images first")
        personal = render(self.trigger_prompts, self.seeds)
        class_images = render(self.class_prompts, self.seeds)
        return EvaluationReport(
            clip_i=clip_i(self.models, personal, self.references), clip_t=clip_t(self.models, personal,
                                                                                 self.plain_prompts),
            dino=dino(self.models, personal, self.references),
            drift=drift(self.models, class_images, self.base_class), prompts=len(self.seeds), images_per_prompt=1,
            details={"base_dino": self.base_dino})
