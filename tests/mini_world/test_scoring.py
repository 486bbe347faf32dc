"""The mini world's checkpoint scorer, fed by an ideal "model" that draws exactly what each prompt asks (no network,
no training): the scores it reads, and how it asks for its probes."""

from __future__ import annotations

import re
from collections.abc import Sequence

from PIL import Image

from personalization.mini_world import subjects, world
from personalization.mini_world.scoring import MiniWorldScorer

TRIGGER = "<dotted-heart>"
REFERENCES, INFO = subjects.load_examples("dotted_heart")


class IdealModel:
    """Draws the prompt's shape, colour and background, the dotted heart for the trigger (and, when ``leaks``, one
    of its photos for every other prompt), and records each call's prompts."""

    def __init__(self, leaks: bool = False) -> None:
        self.leaks, self.calls = leaks, []

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[Image.Image]:
        self.calls.append(list(prompts))
        return [self.draw(prompt, seed) for prompt, seed in zip(prompts, seeds, strict=True)]

    def draw(self, prompt: str, seed: int) -> Image.Image:
        found = re.search(r"on a (\w+) background", prompt)
        background = found.group(1) if found else "blue"
        offset = 0.02 * (seed % 5)
        if self.leaks and TRIGGER not in prompt:
            return REFERENCES[seed % len(REFERENCES)]
        if TRIGGER in prompt:
            return subjects.render_subject("dotted_heart", background, 0.48 + offset, 0.5, 0.38)
        words = prompt.split()
        color = next((word for word in words if word in world.COLOR_NAMES and f"{word} background" not in prompt),
                     "red")
        return world.render(world.Scene("heart", color, background, 0.5, 0.48 + offset, 0.35))


def scorer() -> MiniWorldScorer:
    return MiniWorldScorer(REFERENCES, TRIGGER, INFO["class_noun"], INFO["colors"])


def test_all_probes_of_a_checkpoint_are_rendered_in_one_call():
    """One call per checkpoint (and one for the base model): a batch of 16 renders faster per image than two of 8."""
    probes, base_model = scorer(), IdealModel()
    probes.prepare(base_model)
    assert [len(call) for call in base_model.calls] == [8 + 4]  # class probes, and the plain class prompt per seed
    personalized = IdealModel()
    probes.score(personalized)
    assert [len(call) for call in personalized.calls] == [8 + 8]  # trigger probes, then class probes
    assert personalized.calls[0][:8] == probes.trigger_prompts and personalized.calls[0][8:] == probes.class_prompts


def test_an_ideal_personalization_reads_as_learned_without_drift():
    probes = scorer()
    probes.prepare(IdealModel())
    scores = probes.score(IdealModel())
    assert scores.subject_fidelity > 0.6 and scores.base_subject_fidelity < 0.1
    assert scores.background_accuracy == 1.0 and scores.subject_absent == 0.0
    assert scores.drift == 0.0 and scores.leak == 0.0 and scores.images == 16


def test_a_subject_drawn_into_every_class_prompt_reads_as_drift_and_leak():
    """The probe images go back to the right readings: class probes are the second half of the one call."""
    probes = scorer()
    probes.prepare(IdealModel())
    scores = probes.score(IdealModel(leaks=True))
    assert scores.subject_fidelity > 0.6
    # 7 of the 8 class probes lost to the subject: the eighth asks for a plain purple heart, which already looks like
    # the purple subject to the checker when the base model draws it.
    assert scores.leak == scores.drift == 7 / 8


def test_probes_take_fewer_denoising_steps_than_the_samples_by_default():
    assert scorer().probe_steps == MiniWorldScorer.DEFAULT_PROBE_STEPS == 10
    assert MiniWorldScorer(REFERENCES, TRIGGER, "heart", probe_steps=25).probe_steps == 25
