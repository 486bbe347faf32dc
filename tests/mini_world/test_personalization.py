"""On the shipped mini model, personalization must learn the subject and keep the class: small, fast versions of
the issue's bars, with fixed seeds and no mocks."""

import json
from pathlib import Path

import pytest
import torch

from personalization.config import TrainingConfig
from personalization.device import BUNDLED_MINI_MODEL
from personalization.generation import Generator
from personalization.images import load_subject_images
from personalization.mini_world.scoring import score_personalization
from personalization.trainer import train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def generator():
    return Generator(device=torch.device("cpu"), dtype=torch.float32)


def test_two_stage_learns_the_subject_and_keeps_the_class(tmp_path, generator):
    subject = EXAMPLES / "striped_star"
    info = json.loads((subject / "subject.json").read_text())
    # The default recipe, as the app and the CLI run it on a CPU.
    # The last step, unscored: this test is about the method (tests/test_snapshots.py covers the checkpoints).
    config = TrainingConfig(class_noun=info["class_noun"], base_model=BUNDLED_MINI_MODEL, sample_count=0, seed=0,
                            checkpoints=0, score_checkpoints=False)
    artifact = train(config, subject, tmp_path / "star").output_dir
    references = load_subject_images(subject, 32).images
    scores = score_personalization(generator, artifact, references, info["colors"], seeds=3, class_probes=6,
                                   steps=20)
    # Learning: the trigger prompt draws the subject far better than the base model draws "a photo of a star".
    assert scores.subject_fidelity >= 2 * scores.base_subject_fidelity, scores
    assert scores.subject_fidelity >= 0.15, scores
    # Prompt fidelity: the requested background is kept with the trigger.
    assert scores.background_accuracy >= 2 / 3, scores
    # Keeping: at least half the class prompts without the trigger keep their colour. The striped star is the
    # subject that leaks most: at its last step the default lost 0.34-0.38 of its colour accuracy on 32 probes per
    # seed, DreamBooth 0.41-0.69 (benchmarks/results/quality-mini-2026-11-27-curves.json); the trainer's recommended
    # step, not this last one, is what a run keeps by default.
    assert scores.color_drift <= 1 / 2 + 1e-9, scores
