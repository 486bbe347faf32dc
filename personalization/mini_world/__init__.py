"""A tiny synthetic world (shapes on backgrounds), its novel subjects, and an analytic checker.

The bundled mini base model (personalization/assets/mini_model) is trained on this world by
scripts/train_mini_model.py; see README.md in this folder.
"""

from personalization.mini_world.checker import EvalResult, Reading, evaluate_prompts, read_image, subject_fidelity
from personalization.mini_world.subjects import (
    EXAMPLES_DIR,
    SUBJECTS,
    Subject,
    load_examples,
    reference_images,
    render_subject,
    sample_subject_image,
    write_examples,
)
from personalization.mini_world.world import (
    COLOR_NAMES,
    COLORS,
    HELD_OUT_COMBOS,
    SHAPES,
    Scene,
    caption,
    full_caption,
    is_held_out,
    render,
    sample_scene,
    scene_caption,
)

__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "EXAMPLES_DIR",
    "HELD_OUT_COMBOS",
    "SHAPES",
    "SUBJECTS",
    "EvalResult",
    "Reading",
    "Scene",
    "Subject",
    "caption",
    "evaluate_prompts",
    "full_caption",
    "is_held_out",
    "load_examples",
    "read_image",
    "reference_images",
    "render",
    "render_subject",
    "sample_scene",
    "sample_subject_image",
    "scene_caption",
    "subject_fidelity",
    "write_examples",
]
