"""The Gradio app end to end: gradio_client drives a launched app (tiny base model, loopback fake Hub) over HTTP."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

import app
from personalization.generation import Generator
from personalization.resumable import KEY_PATTERN
from tests.conftest import make_subject_images
from tests.fake_hub import FakeHub, make_token

TOKEN = make_token("alice")
BOB_TOKEN = make_token("bob")
TINY_STEPS = {"stage1_steps": 2, "stage2_steps": 2, "preview_interval": 0}
GENERATE = {"prompt_text": "", "negative_text": "", "seed_value": 7, "steps_value": 4, "guidance_value": 5.0,
            "scale": 1.0, "images": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    url: str
    base: Path | str  # a folder, or a name the app resolves (bundled:mini-shapes)
    hub: FakeHub
    work_root: Path

    def client(self) -> Client:
        """A new client is a new browser session (its own workspace and runs)."""
        return Client(self.url, verbose=False, download_files=str(self.work_root.parent / "downloads"))

    def run_folders(self) -> set[Path]:
        """Every folder under the session workspaces, partial (hidden) ones included."""
        if not self.work_root.is_dir():  # no session has opened yet
            return set()
        return {path for session in self.work_root.iterdir() if session.is_dir() for path in session.iterdir()}


@contextmanager
def running_app(base: Path | str, root: Path) -> Iterator[Served]:
    """The app on a free loopback port, on the `base` model, with its Hub calls going to a fresh fake Hub."""
    with pytest.MonkeyPatch.context() as patch, FakeHub({TOKEN: "alice", BOB_TOKEN: "bob"}) as fake:
        # HF_HUB_OFFLINE=1 (frozen into constants, maybe by another test module) would also block the loopback fake.
        # Downloads go to a fresh cache: the fake's commit ids repeat between runs, a shared cache serves old files.
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub-cache"))
        patch.delenv("HF_TOKEN", raising=False)
        patch.setenv("HF_ENDPOINT", fake.endpoint)  # personalization.hub reads it at call time
        services = app.Services(default_base=str(base), generator=Generator(torch.device("cpu"), torch.float32),
                                hardware="CPU (test)", work_root=root / "sessions")
        with app.served_on_loopback(services, free_port()) as url:
            yield Served(url, base, fake, root / "sessions")


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with running_app(tiny_base, tmp_path_factory.mktemp("app")) as running:
        yield running


def upload(client: Client, files: list[Path]) -> tuple[list, str]:
    gallery, message = client.predict([handle_file(str(f)) for f in files], api_name="/prepare_images")
    return gallery, message


def train(client: Client, timeout: float = 120, **form: object) -> list[tuple]:
    """Every streamed (status, preview, result, resume code) of a `/train` call."""
    job = client.submit(class_noun="widget", trigger="", **{**TINY_STEPS, **form}, api_name="/train")
    job.result(timeout=timeout)
    return [tuple(output) for output in job.outputs()]


def personalized_pixels(result: tuple) -> list[np.ndarray]:
    _, personal = result
    return [np.asarray(Image.open(item["image"])) for item in personal]


@dataclass
class Trained:
    client: Client
    run: str  # the run folder's name: the value of the Generate and Hub tabs' run dropdowns
    instance_prompt: str  # "a photo of a <trigger> widget", as the train message tells
    outputs: list[tuple]


@pytest.fixture(scope="module")
def trained(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One session that uploaded three images and trained the two-stage method a few steps."""
    client = served.client()
    subject = make_subject_images(tmp_path_factory.mktemp("subject"), count=3)
    gallery, message = upload(client, sorted(subject.glob("*.png")))
    assert len(gallery) == 3 and "3 image(s) ready" in message and "64×64" in message
    before = served.run_folders()
    outputs = train(client)
    runs = served.run_folders() - before
    assert len(runs) == 1, outputs[-1]
    prompt = re.search(r"Use \*\*`([^`]+)`\*\* in your prompts", outputs[-1][2])
    assert prompt is not None, outputs[-1]
    return Trained(client, runs.pop().name, prompt.group(1), outputs)


def assert_no_token(*texts: object) -> None:
    for text in texts:
        assert TOKEN not in str(text)
        assert BOB_TOKEN not in str(text)


def assert_no_token_in_files(served: Served) -> None:
    """No file the app wrote (session folders with their runs, the Hub download cache) nor pushed holds a token."""
    files = {str(p): p.read_bytes() for p in served.work_root.parent.rglob("*") if p.is_file()}
    for repo_id, repo in served.hub.repos.items():
        files |= {f"{repo_id}/{name}": data for name, data in repo.files.items()}
    assert files
    for name, data in files.items():
        assert TOKEN.encode() not in data and BOB_TOKEN.encode() not in data, name


# ---- upload ----------------------------------------------------------------------------------------------------------
def test_upload_lists_bad_files_with_their_reason_and_keeps_good_ones(served: Served, tmp_path: Path) -> None:
    good = sorted(make_subject_images(tmp_path / "good", count=2).glob("*.png"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("this is a text file, not a photo")
    (bad / "truncated.png").write_bytes(good[0].read_bytes()[:120])
    Image.new("RGB", (20, 20), "red").save(bad / "tiny.png")
    gallery, message = upload(served.client(), [good[0], bad / "notes.png", bad / "truncated.png", good[1],
                                                bad / "tiny.png"])

    assert len(gallery) == 2
    assert [item["caption"] for item in gallery] == [good[0].name, good[1].name]
    assert "2 image(s) ready" in message
    refused = {line.split("`")[1]: line for line in message.splitlines() if line.startswith("- refused")}
    assert set(refused) == {"notes.png", "truncated.png", "tiny.png"}
    assert "not an image file" in refused["notes.png"]
    assert "damaged or truncated" in refused["truncated.png"]
    assert "20x20 is too small" in refused["tiny.png"] and "32 px" in refused["tiny.png"]


def test_train_without_uploads_says_what_to_do(served: Served) -> None:
    outputs = train(served.client())
    assert len(outputs) == 1
    status, preview, result, code = outputs[0]
    assert "Upload subject images first" in status
    assert preview is None and not result and not isinstance(code, str)  # no run, no code: the browser's is kept


# ---- the whole flow --------------------------------------------------------------------------------------------------
def test_train_streams_progress_and_reports_the_run(trained: Trained, served: Served) -> None:
    statuses = [status for status, *_ in trained.outputs]
    assert "Loading the base model" in statuses[0]
    assert any("step" in s and "total" in s for s in statuses[1:-1]), statuses  # at least one progress event
    status, _, message, code = trained.outputs[-1]
    assert "Done." in status
    # The resume code reached the browser with the first update; a finished run has nothing left to resume.
    assert KEY_PATTERN.fullmatch(trained.outputs[0][3]) and code is None
    assert "Trained **Two-stage (recommended)**" in message
    assert trained.run in message
    run = next(p for p in served.run_folders() if p.name == trained.run)
    assert (run / "training_config.json").is_file() and (run / "README.md").is_file()
    assert (run / "learned_embeds.safetensors").is_file() and (run / "pytorch_lora_weights.safetensors").is_file()


def test_generate_push_load_and_generate_the_same_images(
    trained: Trained, served: Served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    client = trained.client
    prompt = f"{trained.instance_prompt} on the beach"
    local = client.predict(trained.run, **{**GENERATE, "prompt_text": prompt}, base_model=str(served.base),
                           api_name="/generate")
    base_images, personal = local
    assert len(base_images) == 1 and len(personal) == 1
    assert base_images[0]["caption"] == "base · a photo of a widget on the beach"

    pushed = client.predict(trained.run, "my widget", TOKEN, True, api_name="/push")
    assert pushed.startswith("✅ Pushed to") and f"{served.hub.endpoint}/alice/my-widget" in pushed, pushed
    assert "(private)" in pushed
    repo = served.hub.repos["alice/my-widget"]
    assert repo.private and {"README.md", "training_config.json", "learned_embeds.safetensors"} <= set(repo.files)
    assert b"alice/my-widget" in repo.files["README.md"]  # the card's snippet names the repo it lives in

    message, dropdown = client.predict("alice/my-widget", TOKEN, api_name="/load_from_hub")
    assert message == "Loaded `alice/my-widget`."
    assert dropdown["value"] == "hub:alice/my-widget"  # the Generate tab's source switches to it
    assert ["Hub: alice/my-widget", "hub:alice/my-widget"] in dropdown["choices"]
    from_hub = client.predict("hub:alice/my-widget", **{**GENERATE, "prompt_text": prompt},
                              base_model=str(served.base), api_name="/generate")
    assert len(personalized_pixels(from_hub)) == 1
    for before, after in zip(personalized_pixels(local), personalized_pixels(from_hub), strict=True):
        assert before.shape == (256, 256, 3)  # 64 px outputs are shown blown up 4x
        np.testing.assert_array_equal(before, after)
    # The personalization does something: the plain base model draws other pixels for the same seed.
    assert not np.array_equal(np.asarray(Image.open(base_images[0]["image"])), personalized_pixels(local)[0])

    out, err = capfd.readouterr()
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert_no_token(local, pushed, message, dropdown, from_hub, out, err, logged)
    assert_no_token_in_files(served)


def test_a_private_repo_one_session_loaded_is_not_served_to_another(
    trained: Trained, served: Served, capfd: pytest.CaptureFixture[str]
) -> None:
    """Alice's session loads her private repo with her token; other sessions naming it (no token, a token the Hub
    refuses, Bob's valid token) get an error, never the copy the server already holds, and cannot generate with it."""
    from gradio_client.exceptions import AppError

    pushed = trained.client.predict(trained.run, "private-widget", TOKEN, True, api_name="/push")
    assert pushed.startswith("✅ Pushed to"), pushed
    message, _ = trained.client.predict("alice/private-widget", TOKEN, api_name="/load_from_hub")
    assert message == "Loaded `alice/private-widget`."

    for token, says in (("", "no token was given"), (make_token("mallory"), "token was refused"),
                        (BOB_TOKEN, "this token cannot read it")):
        stranger = served.client()
        message, dropdown = stranger.predict("alice/private-widget", token, api_name="/load_from_hub")
        assert message.startswith("⚠️") and says in message, message
        assert "hub:alice/private-widget" not in str(dropdown)
        with pytest.raises(AppError, match="alice/private-widget was not loaded in this session"):
            stranger.predict("hub:alice/private-widget", **{**GENERATE, "prompt_text": "a photo"},
                             base_model=str(served.base), api_name="/generate")
    # What was fetched with a token sits in that session's own folder, not in the server's shared cache.
    shared = served.work_root.parent / "hub-cache"
    assert not any("private-widget" in str(path) for path in shared.rglob("*"))  # nothing when it does not exist
    assert any("private-widget" in str(path) for path in served.work_root.rglob(".hub-cache/*"))
    assert_no_token(capfd.readouterr())


@pytest.mark.parametrize("recorded", ["/etc", "../../x", "someone/huge-model"])
def test_a_downloaded_artifact_may_not_choose_the_base_model(
    trained: Trained, served: Served, capfd: pytest.CaptureFixture[str], recorded: str
) -> None:
    """A Hub repo's training_config.json names any base model it likes; the server loads only one it offers."""
    import json

    from gradio_client.exceptions import AppError

    run = next(p for p in served.run_folders() if p.name == trained.run)
    files = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    config = json.loads(files["training_config.json"]) | {"base_model": recorded}
    files["training_config.json"] = json.dumps(config).encode()
    repo = f"bob/greedy-{len(served.hub.repos)}"  # the fake's commit ids repeat: a fresh name, a fresh snapshot
    served.hub.add_repo(repo, files)
    client = served.client()
    message, _ = client.predict(repo, "", api_name="/load_from_hub")
    assert message == f"Loaded `{repo}`."
    loads = served.hub.requests.copy()
    with pytest.raises(AppError, match=rf"^base model '{re.escape(recorded)}' is not offered here"):
        client.predict(f"hub:{repo}", **{**GENERATE, "prompt_text": "a photo"}, base_model=str(served.base),
                       api_name="/generate")
    assert served.hub.requests == loads  # nothing was fetched for it
    assert "Traceback" not in "".join(capfd.readouterr())


def test_generate_refuses_a_local_base_it_cannot_find(trained: Trained) -> None:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="trained on a local base model"):
        trained.client.predict(trained.run, **{**GENERATE, "prompt_text": "a photo"},
                               base_model="bundled:mini-shapes", api_name="/generate")


# ---- Hub errors ------------------------------------------------------------------------------------------------------
def test_push_errors_are_explained_and_keep_the_local_run(
    trained: Trained, served: Served, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    client = trained.client
    run = next(p for p in served.run_folders() if p.name == trained.run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    answers = []

    answers.append(client.predict(trained.run, "no-token", "", True, api_name="/push"))
    assert answers[-1] == "⚠️ No token: sign in with Hugging Face, paste a write token, or set HF_TOKEN."

    served.hub.add_repo("bob/taken")
    answers.append(client.predict(trained.run, "bob/taken", TOKEN, True, api_name="/push"))
    assert "'bob/taken' exists and this token cannot write to it; choose another name" in answers[-1]

    # The server fails the commit (a status the client does not retry) and echoes the credentials in its error.
    served.hub.fail_next_commits(status=422, message=f"storage is full (Authorization: Bearer {TOKEN})")
    commits = served.hub.commit_count
    pushing = client.submit(trained.run, "half-way", TOKEN, True, api_name="/push")
    pushing.result(timeout=120)
    assert pushing.outputs()[0].startswith("⏳ Pushing `half-way` to the Hub…")  # said before the first attempt
    answers.append(pushing.outputs()[-1])
    assert answers[-1].startswith("⚠️ push failed: storage is full"), answers[-1]
    assert answers[-1].count("the local result is kept") == 1 and "local run is kept" not in answers[-1]
    assert served.hub.commit_count == commits and served.hub.repos["alice/half-way"].files == {}
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # the failed push left the local run as it was

    answers.append(client.predict(trained.run, "half-way", TOKEN, True, api_name="/push"))
    assert answers[-1].startswith("✅ Pushed to") and "alice/half-way" in answers[-1]
    pushed = served.hub.repos["alice/half-way"].files
    assert pushed["training_config.json"] == before[Path("training_config.json")]
    # The pushed card names this repo, not one the run was pushed to before; the local card is not rewritten.
    assert b'"alice/half-way"' in pushed["README.md"] and b"alice/my-widget" not in pushed["README.md"]
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    out, err = capfd.readouterr()
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert_no_token(*answers, out, err, logged)
    assert_no_token_in_files(served)


def test_load_from_hub_errors(served: Served) -> None:
    client = served.client()
    message, _ = client.predict("not a repo id", "", api_name="/load_from_hub")
    assert message == "Give a repo id like `user/name`."
    served.hub.add_repo("bob/private-model", {"README.md": b"# x\n"}, private=True)
    message, _ = client.predict("bob/private-model", TOKEN, api_name="/load_from_hub")
    assert "no model repo 'bob/private-model'" in message and "this token cannot read it" in message
    assert_no_token(message)


# ---- cancel ----------------------------------------------------------------------------------------------------------
def test_cancel_during_training_writes_nothing(served: Served, tmp_path: Path) -> None:
    client = served.client()
    upload(client, sorted(make_subject_images(tmp_path / "subject", count=2).glob("*.png")))
    folders_before = served.run_folders()
    job = client.submit(class_noun="widget", trigger="", stage1_steps=2000, stage2_steps=2000, preview_interval=0,
                        api_name="/train")
    deadline = time.monotonic() + 60
    while not any("step" in str(output[0]) for output in job.outputs()):
        assert time.monotonic() < deadline and not job.done(), job.outputs()
        time.sleep(0.05)
    answer = client.predict(api_name="/cancel")
    assert "Cancelling" in answer
    job.result(timeout=60)
    status, _, result, _ = job.outputs()[-1]
    assert "Training was cancelled; nothing was written." in status and not result
    assert served.run_folders() == folders_before
    # The session can train again after a cancel.
    again = client.submit(class_noun="widget", trigger="", **TINY_STEPS, api_name="/train")
    again.result(timeout=120)
    assert "Done." in again.outputs()[-1][0]


def test_cancel_stops_a_training_waiting_for_the_gpu_before_it_starts(served: Served, tmp_path: Path) -> None:
    photos = sorted(make_subject_images(tmp_path / "subject", count=2).glob("*.png"))
    first, second = served.client(), served.client()
    upload(first, photos)
    upload(second, photos)
    folders_before = served.run_folders()
    running = first.submit(class_noun="widget", trigger="", stage1_steps=2000, stage2_steps=2000, preview_interval=0,
                           api_name="/train")
    wait_for(running, "step")
    waiting = second.submit(class_noun="widget", trigger="", **TINY_STEPS, api_name="/train")
    wait_for(waiting, "Waiting for the GPU")

    assert "Cancelled before it started" in second.predict(api_name="/cancel")
    waiting.result(timeout=60)
    assert "Cancelled before it started; nothing was trained or written." in waiting.outputs()[-1][0]
    assert "Nothing is running or waiting" in second.predict(api_name="/cancel")
    assert "Cancelling" in first.predict(api_name="/cancel")
    running.result(timeout=60)
    assert served.run_folders() == folders_before


def test_cancel_after_a_finished_run_says_nothing_runs(trained: Trained) -> None:
    assert "Nothing is running or waiting in this session." in trained.client.predict(api_name="/cancel")


def wait_for(job: object, text: str, timeout: float = 60) -> None:
    """Until a streamed status holds `text` (event-driven: the stream, not a sleep, says when)."""
    deadline = time.monotonic() + timeout
    while not any(text in str(output[0]) for output in job.outputs()):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline and not job.done(), job.outputs()  # type: ignore[attr-defined]
        time.sleep(0.05)


def test_a_base_model_the_server_does_not_offer_is_refused(served: Served, tmp_path: Path) -> None:
    """Clients can send any string: a server folder or an arbitrary Hub id must not be loaded."""
    from gradio_client.exceptions import AppError

    client = served.client()
    subject = make_subject_images(tmp_path / "subject", count=2)
    files = [handle_file(str(f)) for f in sorted(subject.glob("*.png"))]
    with pytest.raises(AppError, match=r"^Base model: ./etc. is not one of the choices"):
        client.predict(files, "/etc", api_name="/prepare_images")
    upload(client, sorted(subject.glob("*.png")))
    before = served.run_folders()
    with pytest.raises(AppError, match=r"^Base model: ./etc. is not one of the choices"):
        train(client, base_model="/etc")
    assert served.run_folders() == before


def test_checked_base_refuses_paths_even_when_any_hub_id_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    services = app.Services(default_base="bundled:mini-shapes", generator=None, hardware="CPU")  # type: ignore[arg-type]
    assert services.checked_base("") == "bundled:mini-shapes"
    with pytest.raises(ValueError, match="not offered here"):
        services.checked_base("someone/huge-model")
    monkeypatch.setenv("ALLOW_ANY_BASE_MODEL", "1")
    assert services.checked_base("someone/huge-model") == "someone/huge-model"
    for path in ("/etc", "../secrets", "~/x", "a/../../b"):
        with pytest.raises(ValueError, match="not offered here"):
            services.checked_base(path)


def test_own_photos_on_the_mini_model_are_told_what_the_demo_is(tmp_path: Path) -> None:
    from personalization.jobs import Workspace
    from ui.services import Session
    from ui.upload_tab import MINI_WORLD_NOTE, prepare_images

    photos = [str(p) for p in sorted(make_subject_images(tmp_path / "photos", count=3, size=64).glob("*.png"))]
    session = Session(Workspace(tmp_path / "sessions"))
    _, message = prepare_images(photos, "bundled:mini-shapes", session)
    assert "3 image(s) ready" in message and MINI_WORLD_NOTE in message
    _, message = prepare_images(photos, "bundled:mini-shapes", session, own_photos=False)  # an example subject
    assert MINI_WORLD_NOTE not in message


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def test_the_user_picks_another_checkpoint_and_generate_follows_it(trained: Trained, served: Served) -> None:
    from gradio_client.exceptions import AppError

    client = trained.client
    request = {**GENERATE, "prompt_text": trained.instance_prompt}
    last = personalized_pixels(client.predict(trained.run, **request, base_model=str(served.base),
                                              api_name="/generate"))
    run = next(p for p in served.run_folders() if p.name == trained.run)
    assert json.loads((run / "checkpoints" / "checkpoints.json").read_text())["kept_step"] == 4
    assert client.predict("3", api_name="/pick_step") == (
        "The run now holds the checkpoint at step 3: the Generate and Hub tabs use it.")
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == (
        run / "checkpoints" / "step-000003" / "pytorch_lora_weights.safetensors").read_bytes()
    earlier = personalized_pixels(client.predict(trained.run, **request, base_model=str(served.base),
                                                 api_name="/generate"))
    assert not np.array_equal(earlier[0], last[0])
    with pytest.raises(AppError, match="step 5 is not a checkpoint of this run"):
        client.predict("5", api_name="/pick_step")
    with pytest.raises(AppError, match="no finished run to pick a step of"):
        served.client().predict("3", api_name="/pick_step")
    client.predict("4", api_name="/pick_step")
    again = personalized_pixels(client.predict(trained.run, **request, base_model=str(served.base),
                                               api_name="/generate"))
    np.testing.assert_array_equal(again[0], last[0])
