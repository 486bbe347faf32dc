"""Every recipe in mixed precision on the CPU: bf16 autocast (what an A10G, an A100, an H100 and ZeroGPU run) and fp16
autocast with loss scaling (what a T4 runs), on the tiny pipeline. A dtype mismatch between a frozen module and a
trainable one, a cast in place of a frozen module, a loss scaler that skips every step, a precision that silently
falls back to fp32, or images decoded to NaN fail here, in CI, rather than on a user's GPU.
tests/gpu/test_cuda.py runs the same checks (tests/mixed_precision.py) on CUDA with SD-1.5 shapes.
"""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState

from personalization import trainer
from personalization.config import TrainingConfig
from personalization.device import Placement
from personalization.generation import Generator
from personalization.recipes import recipe_for
from tests.mixed_precision import (
    AUTOCAST_DTYPES,
    MEMORY_VARIANTS,
    RECIPES,
    CpuFp16Accelerator,
    StageWatch,
    assert_finite_losses,
    check_artifact,
)
from tests.tiny_pipeline import TINY_RESOLUTION

# The memory options in the precision of the cards that switch them on: a T4 (fp16) for 8-bit Adam + checkpointing,
# an 8 GB RTX 30x0 (bf16) for LoRA + checkpointing.
CASES = [pytest.param(precision, changes, id=f"{precision}-{name}")
         for precision in ("bf16", "fp16") for name, changes in RECIPES]
CASES += [pytest.param(precision, changes, id=f"{precision}-{name}")
          for precision, (name, changes) in zip(("fp16", "bf16"), MEMORY_VARIANTS, strict=True)]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test's precision is its own: accelerate's process-wide state must not leak into other modules."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize(("precision", "changes"), CASES)
def test_each_recipe_trains_in_mixed_precision_and_keeps_frozen_parts_bit_identical(
        tiny_base, subject_dir, tmp_path, monkeypatch, precision, changes):
    monkeypatch.setattr(trainer, "Accelerator", CpuFp16Accelerator)
    watch = StageWatch("cpu").install(monkeypatch)
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), stage1_steps=3, stage2_steps=3,
                            class_images=2, sample_count=1, sample_steps=2, **changes)
    events = []
    result = trainer.train(config, subject_dir, tmp_path / "out", progress=events.append,
                           placement=Placement(torch.device("cpu"), precision))

    assert [record.name for record in watch.records] == [stage.name for stage in recipe_for(config.resolved()).stages]
    watch.assert_ran(precision)
    assert_finite_losses(events, result.config.stage1_steps + result.config.stage2_steps)
    # Generation as on a GPU: the artifact applied to a base pipeline held in the run's low precision.
    check_artifact(result.output_dir, str(tiny_base), Generator(torch.device("cpu"), AUTOCAST_DTYPES[precision]),
                   TINY_RESOLUTION)


def test_the_watch_catches_a_frozen_module_that_moves(tiny_base, subject_dir, tmp_path, monkeypatch):
    """The checks above can fail: a stage that nudges the frozen VAE is reported."""
    watch = StageWatch("cpu").install(monkeypatch)
    run_stage = watch._run_stage

    def nudging(stage, ctx):
        summary = run_stage(stage, ctx)
        with torch.no_grad():
            next(ctx.components.vae.parameters()).view(-1)[0] += 1e-3
        return summary

    watch._run_stage = nudging
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), method="dreambooth_lora", stage2_steps=2,
                            sample_count=0)
    with pytest.raises(AssertionError, match="the VAE moved"):
        trainer.train(config, subject_dir, tmp_path / "out", placement=Placement(torch.device("cpu"), "bf16"))


def test_plain_accelerate_would_train_fp16_on_a_cpu_in_fp32(monkeypatch):
    """Why the fp16 cases need CpuFp16Accelerator: without it a CPU 'fp16' run is fp32, and these tests would pass
    without testing fp16 at all."""
    from accelerate import Accelerator

    with Accelerator(mixed_precision="fp16", cpu=True).autocast():
        assert not torch.is_autocast_enabled("cpu")
    AcceleratorState._reset_state()
    with CpuFp16Accelerator(mixed_precision="fp16", cpu=True).autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16


def test_a_second_run_in_the_same_process_may_use_another_precision(tiny_base, subject_dir, tmp_path, monkeypatch):
    """accelerate keeps one precision per process and refuses another; a server or a notebook trains many runs."""
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), method="dreambooth_lora", stage2_steps=2,
                            sample_count=0)
    trainer.train(config, subject_dir, tmp_path / "fp32", placement=Placement(torch.device("cpu"), "no"))
    watch = StageWatch("cpu").install(monkeypatch)
    trainer.train(config, subject_dir, tmp_path / "bf16", placement=Placement(torch.device("cpu"), "bf16"))
    watch.assert_ran("bf16")
