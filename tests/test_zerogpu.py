"""The app end to end under ZeroGPU's semantics: tests/zerogpu_standin.py in place of ``spaces.GPU``.

The end-to-end tests of tests/test_app.py (upload, train, generate, push, load, cancel) run again here, against the
app built as on a ZeroGPU Space: every GPU call in a forked worker with its values pickled across, model work in the
server process refused, the base pipeline built at start-up. Then what only ZeroGPU asks: each handler that touches a
model did it in one GPU call with a duration from its size, and no worker loaded the base model again; a run
resumed after a restart trains in one GPU call too.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gradio_client import Client

import tests.test_app as e2e
from personalization.artifacts import read_artifact
from personalization.config import ResolvedConfig
from personalization.generation import Generator
from personalization.images import load_subject_images
from personalization.jobs import TrainingJob, Workspace, zero_gpu_generation_seconds, zero_gpu_seconds
from personalization.resumable import new_key
from tests.conftest import make_subject_images
from tests.test_app import (  # noqa: F401  the same tests, collected here with this module's app
    GENERATE,
    Served,
    Trained,
    running_app,
    test_cancel_after_a_finished_run_says_nothing_runs,
    test_cancel_during_training_writes_nothing,
    test_cancel_stops_a_training_waiting_for_the_gpu_before_it_starts,
    test_generate_push_load_and_generate_the_same_images,
    test_generate_refuses_a_local_base_it_cannot_find,
    test_train_streams_progress_and_reports_the_run,
    test_train_without_uploads_says_what_to_do,
)
from tests.test_resumable import interrupted_run, tiny_config
from tests.zerogpu_standin import FORK, ZeroGpuStandIn

trained = e2e.trained  # the session test_app.py trains, trained here on this module's app


@pytest.fixture(scope="module")
def zero_gpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZeroGpuStandIn]:
    standin = ZeroGpuStandIn()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPACES_ZERO_GPU", "true")
        patch.setitem(sys.modules, "spaces", standin.module())
        standin.guard(patch, tmp_path_factory.mktemp("zerogpu") / "base-loads.log")
        yield standin


@pytest.fixture(scope="module")
def served(zero_gpu: ZeroGpuStandIn, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with running_app(tiny_base, tmp_path_factory.mktemp("app")) as running:
        yield running


def test_the_base_pipeline_is_built_at_start_up_and_no_gpu_call_loads_it_again(
        trained: Trained, served: Served, zero_gpu: ZeroGpuStandIn) -> None:
    trained.client.predict(trained.run, **{**GENERATE, "prompt_text": f"{trained.instance_prompt} on the beach"},
                           base_model=str(served.base), api_name="/generate")
    assert zero_gpu.base_log is not None
    loads = zero_gpu.base_log.read_text().splitlines()
    # At start-up, in the server (once per app built); never in a GPU call's worker.
    assert loads and set(loads) == {f"server {served.base}"}, loads
    assert any(call.function == "_draw" for call in zero_gpu.calls)


def test_each_model_step_ran_in_one_gpu_call_sized_by_its_work(trained: Trained, served: Served,
                                                              zero_gpu: ZeroGpuStandIn) -> None:
    before = len(zero_gpu.calls)
    request = {**GENERATE, "prompt_text": f"{trained.instance_prompt} in the snow", "images": 2, "steps_value": 6}
    trained.client.predict(trained.run, **request, base_model=str(served.base), api_name="/generate")
    [call] = zero_gpu.calls[before:]  # personalized and base images: one call
    assert call.function == "_draw"
    assert call.seconds == zero_gpu_generation_seconds(4, 6, 64, str(served.base))

    run = next(p for p in served.run_folders() if p.name == trained.run)
    config = ResolvedConfig.from_dict(read_artifact(run).config)
    trainings = [call for call in zero_gpu.calls if call.function == "run_streamed"]
    assert trainings and trainings[0].seconds == zero_gpu_seconds(config, config.base_model)
    assert not zero_gpu.outside


def test_the_base_images_beside_the_samples_are_drawn_in_a_gpu_call(trained: Trained, served: Served,
                                                                    zero_gpu: ZeroGpuStandIn) -> None:
    """The Train tab's last step (shown after a run): the base model for the samples' prompts and seeds."""
    from ui.services import Services
    from ui.train_tab import trained_samples

    services = Services(default_base=str(served.base), generator=Generator(torch.device("cpu"), torch.float32),
                        hardware="CPU (test)", work_root=served.work_root)
    services.warm_up()
    run = next(p for p in served.run_folders() if p.name == trained.run)
    info = read_artifact(run)
    # As the server holds it after the run: the config with the server's base (the folder records it portably).
    config = dataclasses.replace(ResolvedConfig.from_dict(info.config), base_model=str(served.base))
    job = TrainingJob(config, None, run)  # type: ignore[arg-type]
    job.result = object()  # a finished run; its folder says the rest
    session = services.session(None)
    session.job = job
    before = len(zero_gpu.calls)
    base, samples = trained_samples(services, session)
    assert [call.function for call in zero_gpu.calls[before:]] == ["_draw"]
    assert base["visible"] and len(base["value"]) == len(info.sample_files) == len(samples["value"])
    assert all(caption.startswith("base · ") and info.trigger_token not in caption for _, caption in base["value"])
    assert not zero_gpu.outside


def test_a_resumed_run_trains_in_one_gpu_call(served: Served, zero_gpu: ZeroGpuStandIn, tmp_path: Path) -> None:
    """After a restart the run continues where ZeroGPU runs every training: in one GPU call, as `/train` does."""
    workspace = Workspace(served.work_root)  # the session of the server that was killed
    key = new_key()
    config = tiny_config(Path(str(served.base)))
    images = load_subject_images(make_subject_images(tmp_path / "photos", count=2), 64)
    killed = FORK.Process(target=interrupted_run, args=(workspace, key, config, images))  # the GPU is not here
    killed.start()
    killed.join()
    assert killed.exitcode == 0
    before = len(zero_gpu.calls)
    client = Client(served.url, verbose=False)  # a new session, after the restart
    status, _, message, code = client.predict(key, api_name="/resume")
    assert "Done." in status and "resumed from the checkpoint at step 5" in message and code is None
    [call] = zero_gpu.calls[before:]
    assert call.function == "run_streamed" and call.seconds == zero_gpu_seconds(config, config.base_model)
    assert not zero_gpu.outside
