"""A run resumed after a server restart.

Through the API: the app as a Space runs it (`python app.py`, a server process of its own), killed with SIGKILL once
the run has a checkpoint, a new server on the same work folder, and the run continued through the public API with
the resume code `/train` gave, bit-identical to a run never interrupted. In a browser: the page keeps the code across
the restart, offers the run when it loads, and resumes it with one click.

The tiny pipeline, not the bundled mini model: the mini world scores every checkpoint (about 30 s a run on a 2-core
machine), which these tests do not need."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client
from safetensors.torch import load_file

import app
from personalization import artifacts
from personalization.generation import Generator
from personalization.images import load_subject_images
from personalization.jobs import Workspace
from personalization.resumable import KEY_PATTERN, RECORD_PREFIX, new_key
from scripts.chromium import CHROMIUM
from tests.conftest import make_subject_images
from tests.test_app import free_port, upload
from tests.test_browser import browser_page
from tests.test_resumable import interrupted_run, tiny_config
from tests.tiny_pipeline import TINY_RESOLUTION
from ui.fields import UserError
from ui.resume_panel import STORAGE_KEY, look_up, restore

REPO = Path(__file__).resolve().parent.parent
# Two stage-1 steps to the first checkpoint, then thirty more: time to kill the server between the two.
FORM = {"class_noun": "widget", "trigger": "", "stage1_steps": 2, "stage2_steps": 30, "checkpoints": 0,
        "preview_interval": 0}
START_SECONDS = 120


@contextmanager
def app_server(base: Path, root: Path, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python app.py` on a free port, its sessions under ``root``; killed at the end if still running."""
    port = free_port()
    env = {**os.environ, "BASE_MODEL": str(base), "PERSONALIZATION_WORKDIR": str(root), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SPACE_ID", None)
    with log.open("ab") as out:
        server = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_SECONDS
        while not answers(url):
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield server, url
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=30)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def resume_states(root: Path) -> list[Path]:
    return list(root.glob(f"*/.*.resume/{artifacts.RESUME_STATE_FILE}"))


def finished_run(root: Path, name: str) -> Path:
    [folder] = [path for path in root.glob(f"*/{name}") if (path / artifacts.CONFIG_FILE).is_file()]
    return folder


def run_name(message: str) -> str:
    found = re.search(r"Saved as run `([^`]+)`", message)
    assert found is not None, message
    return found.group(1)


def assert_same_weights(expected: Path, got: Path) -> None:
    names = sorted(path.relative_to(expected).as_posix() for path in expected.rglob("*.safetensors"))
    assert names and names == sorted(path.relative_to(got).as_posix() for path in got.rglob("*.safetensors"))
    for name in names:
        want, have = load_file(expected / name), load_file(got / name)
        assert want.keys() == have.keys(), name
        for tensor in want:
            assert torch.equal(want[tensor], have[tensor]), f"{name}: {tensor}"


def test_a_run_killed_with_its_server_resumes_in_a_new_server_bit_identical(tiny_base: Path, tmp_path: Path) -> None:
    root, log = tmp_path / "sessions", tmp_path / "server.log"
    photos = sorted(make_subject_images(tmp_path / "photos", count=2).glob("*.png"))
    with app_server(tiny_base, root, log) as (server, url):
        client = Client(url, verbose=False)
        upload(client, photos)
        job = client.submit(**FORM, api_name="/train")
        deadline = time.monotonic() + 120
        while not resume_states(root):  # the first checkpoint's state is written in one rename
            assert time.monotonic() < deadline and not job.done(), job.outputs()
            time.sleep(0.02)
        server.kill()
        server.wait(timeout=30)
    codes = [output[3] for output in job.outputs() if isinstance(output[3], str)]  # later ones: unchanged
    assert len(codes) == 1 and KEY_PATTERN.fullmatch(codes[0]), job.outputs()
    [state] = resume_states(root)
    assert not [path for path in root.glob("*/*") if (path / artifacts.CONFIG_FILE).is_file()]  # killed mid-run

    with app_server(tiny_base, root, log) as (_, url):
        client = Client(url, verbose=False)  # a new browser session, as after the restart
        note, code, stored = client.predict(codes[0], api_name="/interrupted_run")
        assert "stopped at step 2 of 32" in note and code == stored == codes[0]
        resumed = client.submit(codes[0], api_name="/resume")
        resumed.result(timeout=180)
        status, _, message, left = resumed.outputs()[-1]
        assert "Done." in status and left is None, resumed.outputs()
        assert "resumed from the checkpoint at step 2" in message
        assert not state.exists() and not list(root.glob(f"*/{RECORD_PREFIX}*"))
        adopted = finished_run(root, run_name(message))
        assert adopted.parent != state.parent.parent  # in the new session's folder

        # The same photos and settings, never interrupted, on the same server.
        reference = Client(url, verbose=False)
        upload(reference, photos)
        whole = reference.submit(**FORM, api_name="/train")
        whole.result(timeout=180)
        assert "Done." in whole.outputs()[-1][0], whole.outputs()
        uninterrupted = finished_run(root, run_name(whole.outputs()[-1][2]))
    assert_same_weights(uninterrupted, adopted)



@contextmanager
def in_process_app(base: Path, root: Path, port: int) -> Iterator[str]:
    """The app served from this process on ``port``: the same port after a restart is the same site to a browser."""
    services = app.Services(default_base=str(base), generator=Generator(torch.device("cpu"), torch.float32),
                            hardware="CPU (test)", work_root=root)
    with app.served_on_loopback(services, port) as url:
        yield url


def test_the_page_keeps_the_code_over_a_restart_and_offers_the_run(tiny_base: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    if os.environ.get("SKIP_BROWSER_TESTS") == "1":
        pytest.skip("SKIP_BROWSER_TESTS=1")
    if not CHROMIUM.is_file():
        pytest.fail(f"this test needs Debian's chromium at {CHROMIUM} (or SKIP_BROWSER_TESTS=1)", pytrace=False)
    root, port, key = tmp_path / "sessions", free_port(), new_key()
    photos = load_subject_images(make_subject_images(tmp_path / "photos", count=2), TINY_RESOLUTION)
    interrupted_run(Workspace(root), key, tiny_config(tiny_base), photos)  # killed with the previous server
    code_box = "#resume-code textarea, #resume-code input"
    with in_process_app(tiny_base, root, port) as url, browser_page(url, tmp_path / "profile") as (_, page):
        # A run started here shows its code while it trains.
        page.locator("#subject-files input[type=file]").set_input_files(
            sorted(str(path) for path in (tmp_path / "photos").glob("*.png")))
        expect(page.locator("#upload-status")).to_contain_text("2 image(s) ready")
        page.locator("#class-noun textarea, #class-noun input").first.fill("box")
        page.get_by_role("tab", name="2 · Train").click()
        page.get_by_text("Resume an interrupted run").click()
        page.get_by_text("Hyperparameters (prefilled by the preset)").click()
        for label, value in (("U-Net steps", "2000"), ("Preview every N steps (0: off)", "0")):
            page.get_by_label(label, exact=True).fill(value)
        page.locator("#start-training").click()
        expect(page.locator(code_box).first).to_have_value(KEY_PATTERN, timeout=60_000)
        page.locator("#cancel-training").click()
        # Emptied when the run has ended: a cancelled run has nothing to resume.
        expect(page.locator(code_box).first).to_have_value("", timeout=60_000)
        page.locator(code_box).first.fill(key)  # from another device: the code pasted
        page.locator("#find-run").click()
        expect(page.locator("#resume-note")).to_contain_text("stopped at step 5 of 7")
    with in_process_app(tiny_base, root, port) as url, browser_page(url, tmp_path / "profile") as (_, page):
        # A new server and a new page: the browser still holds the code, and the page opens on the run.
        expect(page.get_by_role("tab", name="2 · Train")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#resume-note")).to_contain_text("stopped at step 5 of 7")
        expect(page.locator(code_box).first).to_have_value(key)
        page.locator("#resume-run").click()
        expect(page.locator("#train-result")).to_contain_text("resumed from the checkpoint at step 5",
                                                              timeout=120_000)
        expect(page.locator("#train-progress")).to_contain_text("Done.")
        expect(page.locator("#train-samples img").first).to_be_visible()
        page.reload()  # a finished run is not offered again, and its code is no longer kept
        expect(page.get_by_role("tab", name="1 · Upload")).to_have_attribute("aria-selected", "true")
        page.wait_for_function(f"() => localStorage.getItem({STORAGE_KEY!r}) === null")
        page.get_by_role("tab", name="2 · Train").click()
        expect(page.locator("#start-training")).to_be_visible()
        expect(page.locator("#resume-note")).to_be_hidden()  # the panel stays closed


def test_a_stored_code_whose_record_this_version_cannot_read_is_dropped_on_page_load(tiny_base: Path,
                                                                                    tmp_path: Path) -> None:
    """A restart is often a new version of the app: a run recorded with a setting it no longer has is not offered,
    and the page load that finds it neither fails nor keeps the code (else every later load fails the same way)."""
    root, key = tmp_path / "sessions", new_key()
    photos = load_subject_images(make_subject_images(tmp_path / "photos", count=2), TINY_RESOLUTION)
    interrupted_run(Workspace(root), key, tiny_config(tiny_base), photos)
    [record] = root.glob(f"*/{RECORD_PREFIX}*")
    values = json.loads((record / "run.json").read_text())
    (record / "run.json").write_text(json.dumps({**values, "config": {**values["config"], "retired_option": 1}}))
    services = app.Services(default_base=str(tiny_base), generator=Generator(torch.device("cpu"), torch.float32),
                            hardware="CPU (test)", work_root=root)
    panel, note, code, stored, tabs = restore(services, key)
    assert stored is None, (panel, note, code, stored, tabs)
    with pytest.raises(UserError) as refusal:
        look_up(services, key)
    assert refusal.value.message.startswith("This run was recorded by another version of this app"), refusal.value
