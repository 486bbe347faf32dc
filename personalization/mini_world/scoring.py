"""Scores of a personalization on the mini world, read by the analytic checker (no learned metric involved).

- subject fidelity: `subject_fidelity` of images from trigger prompts against the subject's references
  (and the same for the base model's images of the plain class prompt: the "before" value);
- prompt fidelity: the requested background colour is right in images of trigger prompts with a background;
- drift: colour and shape accuracy of class prompts *without* the trigger ("a photo of a yellow star on a blue
  background"), personalized model vs base model with the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from personalization.generation import GenerationRequest, Generator
from personalization.mini_world.checker import read_image, subject_fidelity
from personalization.mini_world.world import COLOR_NAMES, full_caption


@dataclass
class MiniWorldScores:
    subject_fidelity: float
    base_subject_fidelity: float
    background_accuracy: float
    class_color_accuracy: float
    class_shape_accuracy: float
    base_class_color_accuracy: float
    base_class_shape_accuracy: float
    images: int

    @property
    def color_drift(self) -> float:
        """Points of class-prompt colour accuracy lost (positive = forgot)."""
        return self.base_class_color_accuracy - self.class_color_accuracy

    @property
    def shape_drift(self) -> float:
        return self.base_class_shape_accuracy - self.class_shape_accuracy

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "color_drift": self.color_drift, "shape_drift": self.shape_drift}


def score_personalization(
    generator: Generator, artifact: Path, references: Sequence[Image.Image], subject_colors: Sequence[str] = (),
    *, seeds: int = 4, steps: int = 25, guidance_scale: float = 5.0, base_model: str | None = None,
) -> MiniWorldScores:
    """Generate the trigger and class prompts with and without the artifact and read every image."""
    info = generator.apply(artifact, base_model=base_model)
    noun, trigger = info.class_noun, info.trigger_token
    resolution = info.config.get("resolution")

    def render(prompt: str, seed: int, personalized: bool = True) -> Image.Image:
        request = GenerationRequest(prompt=prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
                                    resolution=resolution)
        return generator.generate(request, personalized=personalized)[0]

    backgrounds = [c for c in COLOR_NAMES if c not in set(subject_colors)] or list(COLOR_NAMES)
    fidelity, base_fidelity, background_hits, background_total = [], [], 0, 0
    for seed in range(seeds):
        fidelity.append(subject_fidelity(render(f"a photo of a {trigger} {noun}", seed), references))
        base_fidelity.append(subject_fidelity(render(f"a photo of a {noun}", seed, personalized=False), references))
        background = backgrounds[seed % len(backgrounds)]
        image = render(f"a photo of a {trigger} {noun} on a {background} background", seed)
        fidelity.append(subject_fidelity(image, references))
        background_hits += read_image(image).background == background
        background_total += 1

    color_hits = shape_hits = base_color_hits = base_shape_hits = total = 0
    for seed in range(seeds):
        color = COLOR_NAMES[seed % len(COLOR_NAMES)]
        background = next(c for c in (COLOR_NAMES[(seed + 3) % len(COLOR_NAMES)], "blue", "green") if c != color)
        prompt = full_caption(noun, color, background)
        for personalized in (True, False):
            reading = read_image(render(prompt, 1000 + seed, personalized=personalized))
            if personalized:
                color_hits += reading.color == color
                shape_hits += reading.shape == noun
            else:
                base_color_hits += reading.color == color
                base_shape_hits += reading.shape == noun
        total += 1
    return MiniWorldScores(
        subject_fidelity=sum(fidelity) / len(fidelity),
        base_subject_fidelity=sum(base_fidelity) / len(base_fidelity),
        background_accuracy=background_hits / max(background_total, 1),
        class_color_accuracy=color_hits / total,
        class_shape_accuracy=shape_hits / total,
        base_class_color_accuracy=base_color_hits / total,
        base_class_shape_accuracy=base_shape_hits / total,
        images=len(fidelity) + len(base_fidelity) + 2 * total,
    )
