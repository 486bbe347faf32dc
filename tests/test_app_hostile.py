"""Every public endpoint of the app, driven as a hostile client would: values out of range, of the wrong type, NaN and
infinities, oversized text, path-like strings and choices not offered.

For each: one sentence that names the field, no traceback in the server's log (a user's mistake is not a crash),
nothing written, and the server still answers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from personalization.images import sort_subject_images
from tests.conftest import make_mixed_upload, make_subject_images
from tests.test_app import TOKEN, Served, running_app, upload

LONG = "x" * 20_000
TRAIN_BASE = {"class_noun": "widget", "trigger": ""}
TRAIN_FIELDS = {  # the /train parameter and the label its message names
    "stage1_steps": "Stage 1 / TI steps", "stage2_steps": "U-Net steps", "lora_rank": "LoRA rank",
    "max_batch_size": "Images per step", "seed": "Seed", "class_images": "Class images",
    "preview_interval": "Preview every N steps (0: off)", "stage1_learning_rate": "Stage 1 / TI learning rate",
}


@pytest.fixture(scope="module")
def served(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with running_app(tiny_base, tmp_path_factory.mktemp("hostile-app")) as running:
        yield running


@pytest.fixture(scope="module")
def client(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Client:
    """A session that has uploaded good photos, so /train reaches its own checks."""
    client = served.client()
    upload(client, sorted(make_subject_images(tmp_path_factory.mktemp("photos"), count=2).glob("*.png")))
    return client


@pytest.fixture
def quiet_server(served: Served, caplog: pytest.LogCaptureFixture,
                 capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """After the test: no traceback logged, nothing written, and the server still answers a plain call."""
    caplog.set_level(logging.INFO)
    folders, repos = served.run_folders(), dict(served.hub.repos)
    yield
    out, err = capfd.readouterr()
    logged = "\n".join(f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records)
    assert "Traceback" not in out + err + logged, (out + err + logged)[-3000:]
    assert served.run_folders() == folders and served.hub.repos == repos
    assert served.client().predict("dog", api_name="/suggest_trigger").startswith("<")


def refused(client: Client, api_name: str, *args: object, **kwargs: object) -> str:
    """The one-line message of a call the app must refuse."""
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "upstream Gradio app" not in message, message
    return message


def raw_call(served: Served, api_name: str, body: str) -> tuple[str, object]:
    """POST a JSON body as written (NaN and Infinity included, which gradio_client cannot send) and return the
    final server-sent event and its data."""
    with httpx.Client(base_url=served.url, timeout=60) as http:
        answer = http.post(f"gradio_api/call/{api_name}", content=body, headers={"content-type": "application/json"})
        answer.raise_for_status()
        stream = http.get(f"gradio_api/call/{api_name}/{answer.json()['event_id']}").text
    events = [block for block in stream.strip().split("\n\n") if block.startswith("event:")]
    kind, _, data = events[-1].partition("\ndata:")
    value = json.loads(data) if data.strip() else None
    return kind.removeprefix("event:").strip(), value.get("error") if isinstance(value, dict) else value


# ---- /train ----------------------------------------------------------------------------------------------------------
WRONG_KINDS = [(field, value) for field in TRAIN_FIELDS for value in ("abc", 2.5, [1], {"a": 1}, True)
               if not (value == 2.5 and field.endswith("learning_rate"))]  # 2.5 is a number; the config refuses it


@pytest.mark.parametrize(("field", "value"), WRONG_KINDS)
def test_train_numbers_of_the_wrong_kind(client: Client, quiet_server: None, field: str, value: object) -> None:
    message = refused(client, "/train", **{**TRAIN_BASE, field: value})
    assert message.startswith(f"{TRAIN_FIELDS[field]}: must be "), message


@pytest.mark.parametrize(("field", "value", "says"), [
    ("stage1_steps", -1, "Stage 1 / TI steps: must be at least 0, got -1."),
    ("lora_rank", 0, "LoRA rank: must be at least 1, got 0."),
    ("seed", -5, "Seed: must be at least 0, got -5."),
])
def test_train_numbers_below_the_box_minimum(client: Client, quiet_server: None, field: str, value: int,
                                             says: str) -> None:
    assert refused(client, "/train", **{**TRAIN_BASE, field: value}) == says


@pytest.mark.parametrize(("field", "value", "says"), [
    ("stage1_steps", 10**9, "Stage 1 / TI steps: must be at most 100000, got 1000000000."),
    ("seed", 2**40, "Seed: must be at most 4294967295, got 1099511627776."),
    ("stage2_learning_rate", 2.5, "U-Net learning rate: must be at most 1, got 2.5."),
    ("max_batch_size", 10_000, "Images per step: must be at most 64, got 10000."),
])
def test_train_numbers_above_the_field_maximum(client: Client, quiet_server: None, field: str, value: object,
                                               says: str) -> None:
    assert refused(client, "/train", **{**TRAIN_BASE, field: value}) == says


def test_train_options_the_method_does_not_take(client: Client, quiet_server: None) -> None:
    status, _, result, _ = client.predict(**{**TRAIN_BASE, "method": "two_stage", "prior_preservation": True},
                                       api_name="/train")
    assert "Invalid settings: prior_preservation" in status and not result


@pytest.mark.parametrize(("field", "value", "label"), [
    ("method", "rm -rf", "Method"), ("stage2_mode", "half", "Stage 2 (two-stage): LoRA or full U-Net"),
    ("subject_type", "../../etc", "Subject type (preset)"), ("base_model", "/etc", "Base model"),
    ("base_model", "someone/huge-model", "Base model"),
])
def test_train_choices_not_offered(client: Client, quiet_server: None, field: str, value: str, label: str) -> None:
    message = refused(client, "/train", **{**TRAIN_BASE, field: value})
    assert message.startswith(f"{label}: '{value}' is not one of the choices"), message


@pytest.mark.parametrize(("field", "value", "says"), [
    ("class_noun", LONG, "Class noun: is too long (20000 characters, at most 100)."),
    ("trigger", LONG, "Trigger word: is too long (20000 characters, at most 100)."),
    ("class_noun", 7, "Class noun: must be text, got int."),
    ("prior_preservation", "yes", "DreamBooth: prior preservation (class images): must be true or false, got 'yes'."),
])
def test_train_text_and_switches(client: Client, quiet_server: None, field: str, value: object, says: str) -> None:
    assert refused(client, "/train", **{**TRAIN_BASE, field: value}) == says


def test_train_empty_class_noun_names_the_field(client: Client, quiet_server: None) -> None:
    status, *_ = client.predict(**{**TRAIN_BASE, "class_noun": "  "}, api_name="/train")
    assert "class_noun" in status and "Invalid settings" in status


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_train_nan_and_infinities(served: Served, quiet_server: None, literal: str) -> None:
    kind, data = raw_call(served, "train", f'{{"data": ["widget", "", "object", "two_stage", "lora", null, '
                                           f'{literal}, 0.001, 2, 0.001, 4, 1, 0, 10, 0, false, false, false, false, '
                                           'false, 4]}')
    assert kind == "error" and data == f"Stage 1 / TI steps: must be a finite number, got {float(literal)}.", data


# ---- /generate -------------------------------------------------------------------------------------------------------
GOOD_GENERATION = {"choice": "no-such-run", "prompt_text": "a photo", "negative_text": "", "seed_value": 0,
                   "steps_value": 4, "guidance_value": 5.0, "scale": 1.0, "images": 1}


@pytest.mark.parametrize(("field", "value", "says"), [
    ("steps_value", 0, "Steps: must be at least 1, got 0."),
    ("steps_value", 10**6, "Steps: must be at most 100, got 1000000."),
    ("steps_value", "abc", "Steps: must be a number, got 'abc'."),
    ("guidance_value", -1, "Guidance: must be at least 0, got -1."),
    ("scale", 9, "LoRA scale: must be at most 1.5, got 9."),
    ("images", 2.5, "Images: must be a whole number, got 2.5."),
    ("seed_value", [1], "Seed: must be a number, got '[1]'."),
    ("prompt_text", LONG, "Prompt: is too long (20000 characters, at most 2000)."),
    ("negative_text", {"a": 1}, "Negative prompt: must be text, got dict."),
    ("base_model", "../../etc", "Base model: '../../etc' is not one of the choices"),
])
def test_generate_values(client: Client, quiet_server: None, field: str, value: object, says: str) -> None:
    assert refused(client, "/generate", **{**GOOD_GENERATION, field: value}).startswith(says)


@pytest.mark.parametrize(("choice", "says"), [
    ("no-such-run", "no run named no-such-run in this session"),
    ("../../../etc/passwd", "no run named passwd in this session"),
    ("hub:bob/private-model", "bob/private-model was not loaded in this session"),
    (LONG, "Model: a run of this session or a loaded Hub repo: '"),
])
def test_generate_a_model_this_session_does_not_own(client: Client, quiet_server: None, choice: str,
                                                    says: str) -> None:
    assert refused(client, "/generate", **{**GOOD_GENERATION, "choice": choice}).startswith(says)


def test_generate_empty_prompt(client: Client, quiet_server: None) -> None:
    assert refused(client, "/generate", **{**GOOD_GENERATION, "prompt_text": " "}) == "prompt is empty"


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_generate_nan_and_infinities(served: Served, quiet_server: None, literal: str) -> None:
    kind, data = raw_call(served, "generate", f'{{"data": ["x", "a photo", "", 0, 4, {literal}, 1.0, 1, null]}}')
    assert kind == "error" and data == f"Guidance: must be a finite number, got {float(literal)}.", data


# ---- upload, examples, trigger ---------------------------------------------------------------------------------------
def test_prepare_images_refuses_server_paths(served: Served, quiet_server: None) -> None:
    for path in ("/etc/passwd", "../../etc/passwd", str(Path(__file__).resolve())):
        body = json.dumps({"data": [[{"path": path, "meta": {"_type": "gradio.FileData"}}], None]})
        kind, data = raw_call(served, "prepare_images", body)
        assert kind == "error" and isinstance(data, str) and data.startswith("Photos of your subject: "), data
        assert "\n" not in data


@pytest.mark.parametrize(("args", "says"), [
    (([], "/etc"), "Base model: '/etc' is not one of the choices"),
    (("not a list", None), "Photos of your subject: "),
])
def test_prepare_images_values(client: Client, quiet_server: None, args: tuple, says: str) -> None:
    assert refused(client, "/prepare_images", *args).startswith(says)


@pytest.mark.parametrize("name", ["../../etc", "striped star/../../x", LONG])
def test_load_example_unknown(client: Client, quiet_server: None, name: str) -> None:
    message = refused(client, "/load_example", name, None)
    assert message.startswith("…or an example subject: '") and "is not one of the choices" in message


def test_suggest_trigger_oversized(client: Client, quiet_server: None) -> None:
    assert refused(client, "/suggest_trigger", LONG) == "Class noun: is too long (20000 characters, at most 100)."


# ---- Hub endpoints ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "says"), [
    (("../../etc/passwd", ""), "Give a repo id like `user/name`."),
    (("user/../../x", ""), "Give a repo id like `user/name`."),
    (("a/b c", ""), "Give a repo id like `user/name`."),
])
def test_load_from_hub_bad_ids_answer_in_the_status(client: Client, quiet_server: None, args: tuple,
                                                    says: str) -> None:
    message, _ = client.predict(*args, api_name="/load_from_hub")
    assert message == says


@pytest.mark.parametrize(("args", "says"), [
    ((LONG, ""), "…or a Hub repo id: is too long (20000 characters, at most 500)."),
    (("a/b", 5), "Token (private repos): must be text, got int."),
])
def test_load_from_hub_values(client: Client, quiet_server: None, args: tuple, says: str) -> None:
    assert refused(client, "/load_from_hub", *args) == says


@pytest.mark.parametrize(("args", "says"), [
    (("run", "name", TOKEN, "yes"), "Private: must be true or false, got 'yes'."),
    (("run", LONG, TOKEN, True), "Repo name: is too long (20000 characters, at most 500)."),
    (("run", "name", ["t"], True), "Hugging Face write token (or sign in / set HF_TOKEN): must be text, got list."),
])
def test_push_values(client: Client, quiet_server: None, args: tuple, says: str) -> None:
    message = refused(client, "/push", *args)
    assert message == says and TOKEN not in message


def test_push_a_run_this_session_does_not_own(client: Client, quiet_server: None) -> None:
    answer = client.predict("../../../etc", "name", TOKEN, True, api_name="/push")
    assert answer == "⚠️ no run named etc in this session (your local run is kept; you can retry)"


def test_cancel_with_nothing_running_says_so(client: Client, quiet_server: None) -> None:
    assert "Nothing is running or waiting in this session." in client.predict(api_name="/cancel")


# ---- mixed uploads: the app keeps, refuses and skips exactly what the engine does ------------------------------------
def test_a_mixed_upload_is_judged_file_by_file(served: Served, tmp_path: Path, quiet_server: None) -> None:
    expected = make_mixed_upload(tmp_path / "mixed")
    files = sorted((tmp_path / "mixed").iterdir())
    gallery, message = upload(served.client(), files)

    kept, rejected = sort_subject_images(files, 64)
    used = sorted(name for name, outcome in expected.items() if outcome == "used")
    assert sorted(item["caption"] for item in gallery) == used == sorted(kept.names)
    assert f"**{len(used)} image(s) ready**" in message
    for rejection in rejected:
        assert f"- refused `{rejection.name}`: {rejection.reason}" in message
    assert sorted(r.name for r in rejected) == sorted(n for n, o in expected.items() if o == "refused")
    for skipped in kept.skipped:
        assert f"- note: {skipped}" in message
    assert sorted(s.name for s in kept.skipped) == sorted(n for n, o in expected.items() if o == "skipped")


# ---- /pick_step ------------------------------------------------------------------------------------------------------
PICKER = "Step the run keeps (what Generate and Hub use)"


@pytest.mark.parametrize(("value", "says"), [
    ("3", "Train a model first: there is no finished run to pick a step of."),
    ("x" * 400, f"{PICKER}: {'x' * 80!r} is not one of the choices (none yet)."),
    (7, f"{PICKER}: '7' is not one of the choices (none yet)."),
    ({"a": 1}, f"{PICKER}: \"{{'a': 1}}\" is not one of the choices (none yet)."),
])
def test_pick_step_values(client: Client, quiet_server: None, value: object, says: str) -> None:
    assert refused(client, "/pick_step", value) == says


# ---- resume codes: /resume, /interrupted_run, /discard_run -----------------------------------------------------------
RESUME_ENDPOINTS = ["/resume", "/interrupted_run", "/discard_run"]
NOT_A_CODE = "Resume code: is not a resume code (a resume code is 43 letters, digits, '-' and '_')."


@pytest.mark.parametrize("api_name", RESUME_ENDPOINTS)
@pytest.mark.parametrize(("code", "says"), [
    ("", "Resume code: is empty (paste the code shown when the run started)."),
    ("abc", NOT_A_CODE), ("../../etc/passwd", NOT_A_CODE), ("/etc/passwd", NOT_A_CODE),
    (".." + "x" * 41, NOT_A_CODE), ("x" * 42 + "/", NOT_A_CODE), ("x" * 44, NOT_A_CODE),
    (LONG, "Resume code: is too long (20000 characters, at most 100)."),
    (7, "Resume code: must be text, got int."), (["x" * 43], "Resume code: must be text, got list."),
])
def test_resume_codes_that_are_not_codes(served: Served, quiet_server: None, api_name: str, code: object,
                                         says: str) -> None:
    assert refused(served.client(), api_name, code) == says


@pytest.mark.parametrize("api_name", RESUME_ENDPOINTS)
def test_a_code_no_run_has(served: Served, quiet_server: None, api_name: str) -> None:
    from personalization.resumable import UNKNOWN, new_key

    assert refused(served.client(), api_name, new_key()) == UNKNOWN


def test_the_code_of_a_run_training_in_another_session_is_refused(served: Served, caplog: pytest.LogCaptureFixture,
                                                                  capfd: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    """Codes travel (a shared link, another device): the run of a live session is never taken from it."""
    from personalization.resumable import LIVE, LIVE_DISCARD, UNKNOWN

    caplog.set_level(logging.INFO)
    owner = served.client()
    upload(owner, sorted(make_subject_images(tmp_path / "photos", count=2).glob("*.png")))
    running = owner.submit(**TRAIN_BASE, stage1_steps=2000, stage2_steps=2000, preview_interval=0, api_name="/train")
    deadline = time.monotonic() + 60
    while not any("step" in str(output[0]) for output in running.outputs()):
        assert time.monotonic() < deadline and not running.done(), running.outputs()
        time.sleep(0.05)
    [code] = [output[3] for output in running.outputs() if isinstance(output[3], str)]
    other = served.client()
    assert refused(other, "/resume", code) == LIVE
    assert refused(other, "/discard_run", code) == LIVE_DISCARD
    assert refused(other, "/interrupted_run", code) == ("This run is training right now, in the session that "
                                                        "started it or resumed it.")
    status, *_ = owner.predict(code, api_name="/resume")  # its own session: already busy with it
    assert "A training is already running in this session." in status
    assert "Cancelling" in owner.predict(api_name="/cancel")
    running.result(timeout=60)
    assert refused(other, "/resume", code) == UNKNOWN  # a cancelled run has nothing to resume
    out, err = capfd.readouterr()
    logged = "\n".join(f"{record.getMessage()} {record.exc_text or ''}" for record in caplog.records)
    assert "Traceback" not in out + err + logged, (out + err + logged)[-3000:]
