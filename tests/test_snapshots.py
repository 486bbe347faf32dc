"""Checkpoints taken by the trainer, the kept and picked step, and resuming a killed run (tiny pipeline, CPU)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from personalization import artifacts
from personalization.checkpoints import CheckpointError, read_table
from personalization.config import TrainingConfig
from personalization.snapshots import pick_step, resume_dir
from personalization.trainer import train

STEP_DIR = artifacts.CHECKPOINT_NAME.format


def config(tiny_base: Path, **changes) -> TrainingConfig:
    values = {"class_noun": "box", "base_model": str(tiny_base), "stage1_steps": 3, "stage2_steps": 4,
              "stage2_mode": "lora", "checkpoints": 2, "sample_count": 2, "sample_steps": 2, **changes}
    return TrainingConfig(**values)


def content(path: Path) -> object:
    """A file's bytes; for safetensors, its header as a dict and its tensor bytes: the writer orders the metadata
    keys differently from call to call, which is not a difference in what the file holds."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return data
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, object]:
    return {p.relative_to(folder).as_posix(): content(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


class Crash(RuntimeError):
    pass


def crash_at(step: int):
    def report(event) -> None:
        if event.step == step and event.loss is not None:
            raise Crash(f"killed at step {step}")
    return report


def test_checkpoints_follow_the_schedule_and_hold_what_was_trained_by_then(tiny_base, subject_dir, tmp_path):
    result = train(config(tiny_base), subject_dir, tmp_path / "out")
    table = read_table(result.output_dir)
    assert table is not None and table.steps == [3, 5, 7]
    assert [c.stage for c in table.checkpoints] == ["stage 1 · trigger embedding"] + ["stage 2 · U-Net lora"] * 2
    names = {step: {p.name for p in (result.output_dir / "checkpoints" / STEP_DIR(step=step)).iterdir()}
             for step in table.steps}
    webui_embedding = artifacts.webui_embedding_file(result.config.trigger_token)
    assert names[3] == {"learned_embeds.safetensors", "samples", webui_embedding}
    assert {"learned_embeds.safetensors", "pytorch_lora_weights.safetensors", "samples"} <= names[5] == names[7]
    assert table.scorer is None and not any(c.scores for c in table.checkpoints)  # only the mini world is scored
    assert any("not scored" in note for note in result.notes)
    seconds = [c.training_s for c in table.checkpoints]
    assert seconds == sorted(seconds) and seconds[-1] <= result.seconds_training + 1e-3  # rounded to ms
    # Unscored, "best" keeps the last step: the top level is that checkpoint's files.
    assert table.kept_step == 7
    last = result.output_dir / "checkpoints" / STEP_DIR(step=7)
    for name in ("learned_embeds.safetensors", "pytorch_lora_weights.safetensors", "samples/sample_1.png"):
        assert (result.output_dir / name).read_bytes() == (last / name).read_bytes()
    # Stage 2 freezes the embedding stage 1 learned: bit for bit the same file at both checkpoints.
    assert (last / "learned_embeds.safetensors").read_bytes() == (
        result.output_dir / "checkpoints" / STEP_DIR(step=3) / "learned_embeds.safetensors").read_bytes()
    assert not resume_dir(result.output_dir).exists()


def test_keep_step_puts_that_checkpoint_at_the_top_level(tiny_base, subject_dir, tmp_path):
    result = train(config(tiny_base, keep_step="5"), subject_dir, tmp_path / "out")
    kept = result.output_dir / "checkpoints" / STEP_DIR(step=5)
    assert (result.output_dir / "pytorch_lora_weights.safetensors").read_bytes() == (
        kept / "pytorch_lora_weights.safetensors").read_bytes()
    summary = json.loads((result.output_dir / "training_summary.json").read_text())
    assert summary["kept_step"] == 5


def test_a_keep_step_that_is_no_checkpoint_is_refused_before_training(tiny_base, subject_dir, tmp_path):
    with pytest.raises(CheckpointError, match="keep_step must be best, last or one of the checkpoint steps 3, 5, 7"):
        train(config(tiny_base, keep_step="4"), subject_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "crash_step"),
    [
        ({}, 6),  # inside stage 2: LoRA weights, AdamW moments, generators and batch order restored
        ({}, 4),  # at the start of stage 2: the trigger row and the random state carried over
        ({"stage2_mode": "full"}, 6),
        ({"method": "textual_inversion", "stage1_steps": 6}, 5),
        ({"method": "dreambooth", "stage2_steps": 6, "prior_preservation": True, "class_images": 2,
          "train_text_encoder": True}, 5),
    ],
    ids=["two-stage-lora-mid-stage-2", "two-stage-lora-stage-boundary", "two-stage-full", "textual-inversion",
         "dreambooth-prior-text-encoder"],
)
def test_a_killed_run_resumes_bit_identical_to_one_never_interrupted(tiny_base, subject_dir, tmp_path, changes,
                                                                     crash_step):
    whole = train(config(tiny_base, **changes), subject_dir, tmp_path / "whole")
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        train(config(tiny_base, **changes), subject_dir, out, progress=crash_at(crash_step))
    assert not out.exists() and (resume_dir(out) / artifacts.RESUME_STATE_FILE).is_file()
    resumed = train(config(tiny_base, **changes), subject_dir, out, resume=True)
    assert any("resumed from the checkpoint at step" in note for note in resumed.notes)
    timing = ("training_summary.json", "README.md", "checkpoints/checkpoints.json")
    assert tree(resumed.output_dir, timing) == tree(whole.output_dir, timing)
    assert [c.step for c in read_table(out).checkpoints] == [c.step for c in read_table(whole.output_dir).checkpoints]
    assert not resume_dir(out).exists()


def test_resume_refuses_other_settings_and_a_new_run_does_not_silently_discard_it(tiny_base, subject_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Crash):
        train(config(tiny_base), subject_dir, out, progress=crash_at(6))
    with pytest.raises(artifacts.ArtifactError, match="out: an interrupted run of this folder can be continued with "
                                                      "--resume"):
        train(config(tiny_base), subject_dir, out)
    with pytest.raises(artifacts.ArtifactError, match="the interrupted run used other settings or photos"):
        train(config(tiny_base, stage2_steps=5), subject_dir, out, resume=True)
    train(config(tiny_base), subject_dir, out, overwrite=True)  # starting again is explicit
    assert not resume_dir(out).exists()
    with pytest.raises(artifacts.ArtifactError, match="no interrupted run to resume"):
        train(config(tiny_base), subject_dir, tmp_path / "other", resume=True)


def test_a_cancelled_run_leaves_no_resume_state(tiny_base, subject_dir, tmp_path):
    from personalization.progress import CancelFlag, TrainingCancelled

    cancel = CancelFlag()

    def stop(event) -> None:
        if event.step == 6:
            cancel.cancel()

    with pytest.raises(TrainingCancelled):
        train(config(tiny_base), subject_dir, tmp_path / "out", progress=stop, cancel=cancel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subject"]


def plain_diffusers_images(base: Path, weights_dir: Path, prompt: str) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(weights_dir)
    pipe.load_lora_weights(weights_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=3, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(image)


def test_picking_a_step_switches_the_folder_and_a_push_carries_that_step(tiny_base, subject_dir, tmp_path,
                                                                         monkeypatch):
    import huggingface_hub

    from personalization.hub import download_repo, push_artifact
    from tests.fake_hub import FakeHub, make_token

    result = train(config(tiny_base), subject_dir, tmp_path / "out")
    folder = result.output_dir
    assert pick_step(folder, "5") == 5
    checkpoint = folder / "checkpoints" / STEP_DIR(step=5)
    for name in ("pytorch_lora_weights.safetensors", "samples/sample_0.png"):
        assert (folder / name).read_bytes() == (checkpoint / name).read_bytes()
    assert json.loads((folder / "training_config.json").read_text())["keep_step"] == "5"
    assert read_table(folder).kept_step == 5
    assert "step 5" in (folder / "README.md").read_text()
    with pytest.raises(CheckpointError, match="step 4 is not a checkpoint of this run"):
        pick_step(folder, 4)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    token = make_token("alice")
    with FakeHub({token: "alice"}) as hub:
        push_artifact(folder, "box", token, endpoint=hub.endpoint)
        assert not any(name.startswith("checkpoints/") for name in hub.repos["alice/box"].files)
        pushed = download_repo("alice/box", token=token, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    prompt = result.config.instance_prompt()
    from_push = plain_diffusers_images(tiny_base, Path(pushed), prompt)
    assert np.array_equal(from_push, plain_diffusers_images(tiny_base, checkpoint, prompt))
    last = folder / "checkpoints" / STEP_DIR(step=7)
    assert not np.array_equal(from_push, plain_diffusers_images(tiny_base, last, prompt))


def test_mini_world_checkpoints_are_scored_by_the_checker_and_one_is_recommended(tmp_path):
    """On the bundled mini model every checkpoint gets the analytic checker's scores; at the end of stage 1 only the
    trigger's row has moved, so class prompts (no trigger) draw exactly what the base model draws: no drift."""
    from personalization.config import BUNDLED_MINI_MODEL

    examples = Path(__file__).resolve().parent.parent / "examples" / "striped_star"
    settings = TrainingConfig(class_noun="star", base_model=BUNDLED_MINI_MODEL, stage1_steps=20, stage2_steps=30,
                              checkpoints=2, sample_count=1)
    result = train(settings, examples, tmp_path / "out")
    table = read_table(result.output_dir)
    assert table.scorer == "mini-world checker" and table.steps == [20, 35, 50]
    stage_one = table.checkpoints[0].scores
    assert stage_one["drift"] == 0.0 and stage_one["leak"] == 0.0 and stage_one["drift_se"] == 0.0
    for point in table.checkpoints:
        assert {"fidelity", "drift", "drift_se", "leak", "subject_absent", "background_accuracy"} <= set(point.scores)
        assert 0.0 <= point.scores["fidelity"] <= 1.0 and point.scoring_s > 0
    assert table.recommended_step in table.steps and table.kept_step == table.recommended_step
    assert result.seconds_checkpoints > 0


def tiny_feature_models(root: Path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from personalization.evaluation import FeatureModels

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    CLIPModel(CLIPConfig(text_config={**small, "vocab_size": 49408, "max_position_embeddings": 77},
                         vision_config={**small, "image_size": 32, "patch_size": 8},
                         projection_dim=16)).save_pretrained(root / "clip")
    CLIPTokenizer.from_pretrained(Path(__file__).resolve().parent.parent / "personalization" / "assets" /
                                  "mini_model" / "tokenizer").save_pretrained(root / "clip")
    ViTModel(ViTConfig(**small, image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    return FeatureModels(str(root / "clip"), str(root / "dino"), device=torch.device("cpu"))


def test_real_bases_are_scored_with_clip_and_dino_when_their_weights_are_here(tiny_base, subject_dir, tmp_path):
    from personalization.evaluation import FeatureScorer
    from personalization.images import load_subject_images

    settings = config(tiny_base).resolved()
    references = load_subject_images(subject_dir, 64).images
    scorer = FeatureScorer(tiny_feature_models(tmp_path), references, settings.trigger_token, "box", prompts=2)
    result = train(settings, subject_dir, tmp_path / "out", scorer=scorer)
    table = read_table(result.output_dir)
    assert table.scorer == "CLIP / DINO feature scorer"
    assert all({"fidelity", "drift", "clip_i", "clip_t", "dino"} <= set(c.scores) for c in table.checkpoints)
    assert table.checkpoints[0].scores["drift"] == pytest.approx(0.0, abs=1e-5)  # stage 1: class images unchanged
    assert table.kept_step == table.recommended_step


class ProbeRecorder:
    """A scorer of this test's own: keeps the base model's probe images and scores every checkpoint alike."""

    name, drift_tolerance = "probe recorder", 0.1
    prompts, seeds = ["a photo of a box", "a photo of a box on a table"], [3, 4]

    def __init__(self, probe_steps: int | None) -> None:
        self.probe_steps, self.base_images = probe_steps, []

    def prepare(self, render_base) -> None:
        self.base_images = render_base(self.prompts, self.seeds)

    def score(self, render):
        render(self.prompts, self.seeds)
        return types.SimpleNamespace(as_dict=lambda: {"fidelity": 0.5, "drift": 0.0})


def test_probes_are_rendered_at_the_scorers_steps_and_the_samples_at_their_own(tiny_base, subject_dir, tmp_path):
    """Probes at fewer denoising steps than the samples (the mini world's scorer: 10 against 25), the base model's as
    well as the checkpoints', so drift compares like with like; never more steps than the samples take."""
    from accelerate import Accelerator

    from personalization.device import choose_placement
    from personalization.trainer import load_components, render_batch

    settings = config(tiny_base, sample_steps=4)
    recorder = ProbeRecorder(probe_steps=2)
    result = train(settings, subject_dir, tmp_path / "out", scorer=recorder)
    comps = load_components(str(tiny_base), choose_placement("no", "cpu"))

    def base_images(steps: int) -> list[np.ndarray]:
        images = render_batch(comps, result.config, recorder.prompts, recorder.seeds, Accelerator(cpu=True),
                              steps=steps)
        return [np.asarray(image) for image in images]

    recorded = [np.asarray(image) for image in recorder.base_images]
    assert all(np.array_equal(a, b) for a, b in zip(recorded, base_images(2), strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(recorded, base_images(4), strict=True))
    assert read_table(result.output_dir).recommended_step == 3  # scored: equal scores, the earliest

    capped = ProbeRecorder(probe_steps=9)  # more than the samples' 4: capped at 4
    train(settings, subject_dir, tmp_path / "capped", scorer=capped)
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(capped.base_images, base_images(4), strict=True))
