"""Scores of a personalization on the mini world, read by the analytic checker (no learned metric involved).

One definition serves the quality benchmark, the CLI's ``evaluate`` and the trainer's checkpoints
(:class:`MiniWorldScorer`); only the number of probe images and their denoising steps differ.

- subject fidelity: `subject_fidelity` of images from trigger prompts against the subject's references (0 where the
  subject is absent), and the same for the base model's images of the plain class prompt (the "before" value);
- background accuracy: the requested background is right, counted only in images where the subject is present
  (``subject_absent`` says how often it vanished);
- drift, on class prompts *without* the trigger ("a photo of a yellow star on a blue background"), personalized vs
  base model with the same seeds. An image is *right* when its colour and shape are the prompt's and it does not
  look like the subject (subject fidelity below :data:`LEAK_FIDELITY`). ``drift`` is the share of probes the base
  model drew right minus the share the personalized model did, with the standard error of that paired difference;
  ``color_drift`` / ``shape_drift`` / ``leak`` are its parts (``leak``: the subject's look drawn into plain class
  prompts, which the colour and shape alone do not see).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from personalization.generation import GenerationRequest, Generator
from personalization.mini_world.checker import SubjectReferences, read_image
from personalization.mini_world.world import COLOR_NAMES, full_caption

# A class-prompt image at least this close to the references is the subject, not the class: own renders of the
# bundled subjects score 0.66-0.88 against their references, the base model's class images 0.025 on average.
LEAK_FIDELITY = 0.3
# Seeds of the class probes start here, apart from the trigger probes' seeds.
CLASS_SEED_OFFSET = 1000

# Renders prompts, each with its own seed, with the model as it stands (personalized) or the base model.
Render = Callable[[Sequence[str], Sequence[int]], list[Image.Image]]


@dataclass
class MiniWorldScores:
    subject_fidelity: float
    base_subject_fidelity: float
    background_accuracy: float
    subject_absent: float
    class_color_accuracy: float
    class_shape_accuracy: float
    base_class_color_accuracy: float
    base_class_shape_accuracy: float
    leak: float
    drift: float
    drift_se: float
    images: int

    @property
    def color_drift(self) -> float:
        """Points of class-prompt colour accuracy lost (positive = forgot)."""
        return self.base_class_color_accuracy - self.class_color_accuracy

    @property
    def shape_drift(self) -> float:
        return self.base_class_shape_accuracy - self.class_shape_accuracy

    @property
    def fidelity(self) -> float:
        """The checkpoint table's fidelity (:mod:`personalization.checkpoints`)."""
        return self.subject_fidelity

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "fidelity": self.fidelity, "base_fidelity": self.base_subject_fidelity,
                "color_drift": self.color_drift, "shape_drift": self.shape_drift}


@dataclass(frozen=True)
class _ClassReading:
    color_right: bool
    shape_right: bool
    subject_like: bool

    @property
    def right(self) -> bool:
        return self.color_right and self.shape_right and not self.subject_like


class MiniWorldScorer:
    """Probe prompts and seeds for one subject, and their scores.

    ``trigger_seeds``: each seed renders the trigger phrase alone and on a background (2 images per seed).
    ``class_probes``: class prompts without the trigger, one seed each; drift's resolution is 1 / class_probes.
    ``probe_steps``: denoising steps the trainer renders the probes at (None: the samples' steps).
    :meth:`prepare` renders the base model's images once (before training), :meth:`score` the model as it stands;
    each renders all its probes in one call.
    """

    name = "mini-world checker"
    # Drift (share of class probes lost) a recommended checkpoint may reach: one probe in eight, the resolution of
    # the trainer's default probe set.
    drift_tolerance = 0.125

    DEFAULT_TRIGGER_SEEDS, DEFAULT_CLASS_PROBES = 4, 8
    # Denoising steps of the trainer's probes (the samples take 25). Measured on 40 checkpoints of the default recipe
    # of the time, 400 + 300 (benchmarks/probe_steps.py, 4 subjects x 2 seeds, two seed sets; the tables in
    # benchmarks/results/probe-steps-mini-2026-11-27.md): 10 steps move a checkpoint's fidelity by 0.015 on average,
    # a third of what another choice of probe seeds moves it at 25 steps (0.047); the recommendation matched a 4x
    # larger held-out probe set's in 12 of 16 runs against 14 of 16 at 25 steps, the 4 others its second choice.
    # 5 steps read fine patterns (stripes, the smiley's face) up to 0.11 lower.
    DEFAULT_PROBE_STEPS = 10

    @classmethod
    def default_image_counts(cls) -> tuple[int, int]:
        """Images rendered per checkpoint and, once, for the base model, with the default probes."""
        seeds, probes = cls.DEFAULT_TRIGGER_SEEDS, cls.DEFAULT_CLASS_PROBES
        return 2 * seeds + probes, probes + seeds

    def __init__(self, references: Sequence[Image.Image], trigger_token: str, class_noun: str,
                 subject_colors: Sequence[str] = (), *, trigger_seeds: int = DEFAULT_TRIGGER_SEEDS,
                 class_probes: int = DEFAULT_CLASS_PROBES, probe_steps: int | None = DEFAULT_PROBE_STEPS) -> None:
        self.references, self.noun = SubjectReferences(references), class_noun
        self.probe_steps = probe_steps
        backgrounds = [c for c in COLOR_NAMES if c not in set(subject_colors)] or list(COLOR_NAMES)
        self.trigger_prompts, self.trigger_seeds, self.background_of = [], [], {}
        for seed in range(trigger_seeds):
            background = backgrounds[seed % len(backgrounds)]
            self.trigger_prompts += [f"a photo of a {trigger_token} {class_noun}",
                                     f"a photo of a {trigger_token} {class_noun} on a {background} background"]
            self.trigger_seeds += [seed, seed]
            self.background_of[len(self.trigger_prompts) - 1] = background
        self.class_colors = [COLOR_NAMES[index % len(COLOR_NAMES)] for index in range(class_probes)]
        self.class_prompts = [full_caption(class_noun, color, _background_for(index, color))
                              for index, color in enumerate(self.class_colors)]
        self.class_seeds = [CLASS_SEED_OFFSET + index for index in range(class_probes)]
        self.base_class: list[_ClassReading] | None = None
        self.base_fidelity = 0.0

    def prepare(self, render_base: Render) -> None:
        """Read the base model's class images and its fidelity for the plain class prompt, once per run."""
        seeds = sorted(set(self.trigger_seeds))
        images = render_base(self.class_prompts + [f"a photo of a {self.noun}"] * len(seeds),
                             self.class_seeds + seeds)  # one call: a batch renders faster per image
        self.base_class = self._read_class(images[:len(self.class_prompts)])
        self.base_fidelity = _mean([self.references.fidelity(image) for image in images[len(self.class_prompts):]])

    def score(self, render: Render) -> MiniWorldScores:
        if self.base_class is None:
            raise RuntimeError("MiniWorldScorer.prepare must render the base model's images first")
        images = render(self.trigger_prompts + self.class_prompts, self.trigger_seeds + self.class_seeds)
        trigger_images = images[:len(self.trigger_prompts)]
        personal = self._read_class(images[len(self.trigger_prompts):])
        readings = [read_image(image) for image in trigger_images]
        present = [index for index, reading in enumerate(readings) if reading.color is not None]
        with_background = [index for index in present if index in self.background_of]
        differences = [float(base.right) - float(mine.right) for base, mine in zip(self.base_class, personal,
                                                                                       strict=True)]
        return MiniWorldScores(
            subject_fidelity=_mean([self.references.fidelity(image) for image in trigger_images]),
            base_subject_fidelity=self.base_fidelity,
            background_accuracy=_mean([float(readings[i].background == self.background_of[i])
                                       for i in with_background]),
            subject_absent=1.0 - len(present) / len(readings),
            class_color_accuracy=_mean([float(r.color_right) for r in personal]),
            class_shape_accuracy=_mean([float(r.shape_right) for r in personal]),
            base_class_color_accuracy=_mean([float(r.color_right) for r in self.base_class]),
            base_class_shape_accuracy=_mean([float(r.shape_right) for r in self.base_class]),
            leak=_mean([float(r.subject_like) for r in personal]) - _mean([float(r.subject_like)
                                                                          for r in self.base_class]),
            drift=_mean(differences),
            drift_se=_standard_error(differences),
            images=len(trigger_images) + len(personal),
        )

    def _read_class(self, images: Sequence[Image.Image]) -> list[_ClassReading]:
        readings = []
        for image, color in zip(images, self.class_colors, strict=True):
            reading = read_image(image)
            readings.append(_ClassReading(reading.color == color, reading.shape == self.noun,
                                          self.references.fidelity(image) >= LEAK_FIDELITY))
        return readings


def _background_for(index: int, color: str) -> str:
    return next(c for c in (COLOR_NAMES[(index + 3) % len(COLOR_NAMES)], "blue", "green") if c != color)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _standard_error(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def score_personalization(
    generator: Generator, artifact: Path, references: Sequence[Image.Image], subject_colors: Sequence[str] = (),
    *, seeds: int = 4, class_probes: int = 32, steps: int = 25, guidance_scale: float = 5.0,
    base_model: str | None = None,
) -> MiniWorldScores:
    """Score an artifact folder: generate the probes with and without it and read every image."""
    info = generator.apply(artifact, base_model=base_model)
    resolution = info.config.get("resolution")

    def renderer(personalized: bool) -> Render:
        def render(prompts: Sequence[str], prompt_seeds: Sequence[int]) -> list[Image.Image]:
            return [generator.generate(GenerationRequest(prompt=prompt, seed=seed, steps=steps,
                                                         guidance_scale=guidance_scale, resolution=resolution),
                                       personalized=personalized)[0]
                    for prompt, seed in zip(prompts, prompt_seeds, strict=True)]
        return render

    scorer = MiniWorldScorer(references, info.trigger_token, info.class_noun, subject_colors, trigger_seeds=seeds,
                             class_probes=class_probes, probe_steps=steps)
    scorer.prepare(renderer(personalized=False))
    return scorer.score(renderer(personalized=True))
