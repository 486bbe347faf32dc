import os
import time

import pytest
import torch

from personalization.artifacts import CONFIG_FILE
from personalization.config import ConfigError, TrainingConfig
from personalization.device import BUNDLED_MINI_MODEL, SD15_HUB_ID
from personalization.images import load_subject_images
from personalization.jobs import (
    DEFAULT_LOAD_SECONDS,
    SessionCleaner,
    TrainingJob,
    Workspace,
    describe_failure,
    estimate_seconds,
    hardware_key,
)
from personalization.progress import TrainingCancelled
from tests.tiny_pipeline import TINY_RESOLUTION


def sd15(**changes) -> TrainingConfig:
    return TrainingConfig(**{"class_noun": "dog", "base_model": SD15_HUB_ID, "resolution": 512, **changes})


@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("Tesla T4", "t4"), ("NVIDIA A10G", "a10g"),
    ("NVIDIA GeForce RTX 4090", "a10g"), ("CPU (2 threads, fp32)", "cpu"),
])
def test_hardware_rows_are_found_by_card_name(name, key):
    assert hardware_key(name, SD15_HUB_ID) == key
    assert hardware_key("CPU (2 threads, fp32)", BUNDLED_MINI_MODEL) == "cpu-mini"


def test_estimate_counts_checkpointing_class_images_and_slower_cards():
    plain = estimate_seconds(sd15(stage2_mode="full"), "NVIDIA H200", SD15_HUB_ID)
    checkpointed = estimate_seconds(sd15(stage2_mode="full", gradient_checkpointing=True), "NVIDIA H200", SD15_HUB_ID)
    assert checkpointed - plain == pytest.approx(400 * 0.098 * 1.2)
    dreambooth = estimate_seconds(sd15(method="dreambooth"), "NVIDIA H200", SD15_HUB_ID)
    with_prior = estimate_seconds(sd15(method="dreambooth", prior_preservation=True), "NVIDIA H200", SD15_HUB_ID)
    assert with_prior - dreambooth == pytest.approx(800 * 0.098 * 0.6 + 100 * 1.06)
    assert estimate_seconds(sd15(), "NVIDIA A10G", SD15_HUB_ID) > 3 * estimate_seconds(sd15(), "NVIDIA H200",
                                                                                         SD15_HUB_ID)


def test_a_t4_is_costed_with_the_checkpointing_its_memory_plan_switches_on():
    full = sd15(stage2_mode="full")
    assert estimate_seconds(full, "Tesla T4", SD15_HUB_ID) == pytest.approx(
        estimate_seconds(sd15(stage2_mode="full", gradient_checkpointing=True), "Tesla T4", SD15_HUB_ID))
    lora = sd15(stage2_mode="lora")
    assert estimate_seconds(lora, "Tesla T4", SD15_HUB_ID) < estimate_seconds(
        sd15(stage2_mode="lora", gradient_checkpointing=True), "Tesla T4", SD15_HUB_ID)


def test_estimate_scales_steps_with_pixels_but_not_the_model_load():
    small = estimate_seconds(sd15(resolution=256, sample_count=0), "NVIDIA H200", SD15_HUB_ID)
    large = estimate_seconds(sd15(resolution=512, sample_count=0), "NVIDIA H200", SD15_HUB_ID)
    load = DEFAULT_LOAD_SECONDS
    assert small - load == pytest.approx((large - load) / 4)


@pytest.mark.parametrize(("error", "message"), [
    (TrainingCancelled("stop"), "Training was cancelled; nothing was written."),
    (ConfigError("stage1_steps must be an integer in [0, 100000], got -1"),
     "stage1_steps must be an integer in [0, 100000], got -1"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
     "The GPU ran out of memory. Try LoRA instead of the full U-Net, turn on gradient checkpointing and 8-bit Adam, "
     "or lower the batch size or the resolution."),
    (KeyError("unet"), "Training failed: KeyError: 'unet'"),
])
def test_failures_become_one_sentence(error, message):
    assert describe_failure(error) == message


def test_job_streams_progress_to_the_end_and_writes_a_result(tiny_base, subject_dir, tmp_path):
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), stage1_steps=2, stage2_steps=2,
                            sample_count=0)
    job = TrainingJob(config, load_subject_images(subject_dir, TINY_RESOLUTION), tmp_path / "run").start()
    steps = [event.step for event in job.events(poll_seconds=0.05) if event.loss is not None]
    job.wait()
    assert job.error is None and job.failure_message is None
    assert steps[-1] == 4 and steps == sorted(steps)
    assert (tmp_path / "run" / CONFIG_FILE).is_file()


def test_a_cancelled_job_reports_it_and_leaves_no_folder(tiny_base, subject_dir, tmp_path):
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), stage1_steps=500, stage2_steps=0,
                            sample_count=0)
    job = TrainingJob(config, load_subject_images(subject_dir, TINY_RESOLUTION), tmp_path / "run").start()
    for event in job.events(poll_seconds=0.05):
        if event.loss is not None:
            job.cancel()
    job.wait()
    assert isinstance(job.error, TrainingCancelled)
    assert job.failure_message == "Training was cancelled; nothing was written."
    assert not (tmp_path / "run").exists()


def test_workspace_lists_finished_runs_only_and_old_sessions_are_removed(tmp_path):
    workspace = Workspace(tmp_path / "sessions", "abc")
    run = workspace.new_run_dir("My Dog!")
    assert run.parent == workspace.folder and "-my-dog-" in run.name
    run.mkdir()  # a folder without a config: a run still being written
    assert workspace.runs() == []

    old = Workspace(tmp_path / "sessions", "old")
    stale = time.time() - 48 * 3600
    os.utime(old.folder, (stale, stale))
    assert Workspace.clean_old(tmp_path / "sessions") == 1
    assert not old.folder.exists() and workspace.folder.exists()


def make_idle(folder, hours=48.0):
    stale = time.time() - hours * 3600
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (stale, stale), follow_symlinks=False)


def test_a_session_folder_with_a_run_in_progress_is_never_removed(tmp_path):
    root = tmp_path / "sessions"
    busy, idle = Workspace(root, "busy"), Workspace(root, "idle")
    with busy.in_use():
        make_idle(busy.folder)  # a long run writes nothing for a while: age alone must not decide
        make_idle(idle.folder)
        assert Workspace.clean_old(root) == 1
        assert busy.folder.is_dir() and not idle.folder.exists()
    assert not list(busy.folder.glob(".in-use-*"))
    make_idle(busy.folder)
    assert Workspace.clean_old(root) == 1 and not busy.folder.exists()


def test_a_marker_left_by_a_dead_process_does_not_keep_a_folder(tmp_path):
    root = tmp_path / "sessions"
    crashed = Workspace(root, "crashed")
    (crashed.folder / ".in-use-999999999-deadbeef").touch()  # no such process
    make_idle(crashed.folder)
    assert Workspace.clean_old(root) == 1


def test_a_marker_with_this_processs_pid_counts_only_while_this_process_holds_it(tmp_path):
    """A restarted container often gives the new server the PID of the one that was killed mid-run."""
    root = tmp_path / "sessions"
    left = Workspace(root, "left")
    (left.folder / f".in-use-{os.getpid()}-deadbeef").touch()  # the killed server's marker, same PID
    assert not left.busy
    make_idle(left.folder)
    assert Workspace.clean_old(root) == 1
    held = Workspace(root, "held")
    with held.in_use():
        assert held.busy
    assert not held.busy


def test_the_cleaner_runs_as_sessions_arrive_at_most_every_interval(tmp_path):
    root = tmp_path / "sessions"
    cleaner = SessionCleaner(max_age_hours=24, interval_s=3600)
    first = Workspace(root, "first")
    make_idle(first.folder)
    assert cleaner.maybe_clean(root) == 1  # the first new session of a long-running server cleans
    second = Workspace(root, "second")
    make_idle(second.folder)
    assert cleaner.maybe_clean(root) == 0 and second.folder.is_dir()  # too soon: cheap
    assert cleaner.maybe_clean(root, now=True) == 1


def test_a_job_cancelled_before_it_starts_ends_at_once(tiny_base, subject_dir, tmp_path):
    config = TrainingConfig(class_noun="widget", base_model=str(tiny_base), resolution=TINY_RESOLUTION,
                            stage1_steps=1, stage2_steps=1)
    job = TrainingJob(config, load_subject_images(subject_dir, TINY_RESOLUTION), tmp_path / "run")
    assert job.state == "waiting" and not job.started
    job.cancel()
    assert job.state == "ended" and not job.started
    assert job.failure_message == "Training was cancelled; nothing was written."


def test_busy_is_seen_from_another_process(tmp_path):
    """ZeroGPU runs the training in a forked worker: the server process must still see that the session is busy."""
    import subprocess
    import sys

    workspace = Workspace(tmp_path / "sessions", "s")
    assert not workspace.busy
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from personalization.jobs import Workspace\n"
        f"w = Workspace(Path({str(tmp_path / 'sessions')!r}), 's')\n"
        "with w.in_use():\n    print('in', flush=True); sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "in"
    assert workspace.busy
    child.communicate("done\n", timeout=60)
    assert not workspace.busy


def test_the_estimate_counts_every_checkpoints_samples_and_the_mini_worlds_probes():
    from personalization.config import BUNDLED_MINI_MODEL, TrainingConfig
    from personalization.jobs import checkpoint_images

    mini = TrainingConfig(class_noun="star", base_model=BUNDLED_MINI_MODEL).resolved()
    assert checkpoint_images(mini) == 5 * 4 + 5 * 16 + 12  # stage 1's end and 4 over stage 2
    assert checkpoint_images(TrainingConfig(class_noun="star", base_model=BUNDLED_MINI_MODEL, checkpoints=0,
                                            score_checkpoints=False).resolved()) == 2 * 4
    sd = TrainingConfig(class_noun="dog", base_model=SD15_HUB_ID).resolved()
    assert checkpoint_images(sd) == 5 * 4  # scored only where CLIP and DINO are at hand: not counted


def test_the_estimate_costs_the_probes_at_their_fewer_denoising_steps():
    """The mini world's probes take 10 denoising steps against the samples' 25: 0.4 of a sample each."""
    from personalization.jobs import checkpoint_image_cost, estimate_run

    mini = TrainingConfig(class_noun="star", base_model=BUNDLED_MINI_MODEL).resolved()
    assert checkpoint_image_cost(mini) == pytest.approx(5 * 4 + (5 * 16 + 12) * 10 / 25)
    few_steps = TrainingConfig(class_noun="star", base_model=BUNDLED_MINI_MODEL, sample_steps=8).resolved()
    assert checkpoint_image_cost(few_steps) == 5 * 4 + 5 * 16 + 12  # probes never take more steps than samples
    image_s = estimate_run(mini, "CPU (2 threads, fp32)", BUNDLED_MINI_MODEL).samples_s / checkpoint_image_cost(mini)
    assert image_s == pytest.approx(0.3)  # the cpu-mini row's seconds per sample image
    sd = TrainingConfig(class_noun="dog", base_model=SD15_HUB_ID).resolved()
    assert checkpoint_image_cost(sd) == 5 * 4
