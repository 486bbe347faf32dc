"""personalization.hub against a loopback fake Hub: the real huggingface_hub client code runs unchanged."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from personalization.hub import (
    HubError,
    download_repo,
    push_artifact,
    push_folder,
    repo_url,
    resolve_token,
    slugify_repo_name,
    whoami,
)
from tests.fake_hub import FakeHub, make_token

TOKEN = make_token("alice")
BOB_TOKEN = make_token("bob")

PUSHED = {
    "README.md": b"---\nlicense: creativeml-openrail-m\nlibrary_name: diffusers\n---\n# My subject\n",
    "learned_embeds.safetensors": bytes(range(256)) * 40,
    "unet/config.json": b'{"sample_size": 8}\n',
    "samples/a.png": b"\x89PNG\r\n\x1a\n" + bytes(300),
}
NOT_PUSHED = {
    "checkpoint-100/pytorch_lora_weights.safetensors": b"old weights",
    "optimizer.pt": b"optimizer state",
    "unet/optimizer.bin": b"nested optimizer state",
    "scratch.tmp": b"half-written",
    ".hidden": b"editor state",
}


@pytest.fixture(autouse=True)
def _online_and_clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # HF_HUB_OFFLINE=1 (frozen into constants at import, possibly by another test module) also blocks the loopback
    # fake; a stray HF_TOKEN/HF_ENDPOINT from the shell must not change what these tests send where.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub({TOKEN: "alice", BOB_TOKEN: "bob"}) as fake:
        yield fake


@pytest.fixture
def result(tmp_path: Path) -> Path:
    folder = tmp_path / "result"
    for rel, content in {**PUSHED, **NOT_PUSHED}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(content)
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_push_then_download_gives_identical_files(hub: FakeHub, result: Path, tmp_path: Path) -> None:
    url = push_folder(result, "My Subject", TOKEN, endpoint=hub.endpoint)

    assert url == f"{hub.endpoint}/alice/my-subject"
    assert hub.repos["alice/my-subject"].files == PUSHED
    local = download_repo("alice/my-subject", TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert tree(local) == PUSHED


def test_checkpoints_optimizer_tmp_and_hidden_files_are_not_uploaded(hub: FakeHub, result: Path) -> None:
    push_folder(result, "alice/lora", TOKEN, endpoint=hub.endpoint)

    uploaded = set(hub.repos["alice/lora"].files)
    assert uploaded == set(PUSHED)
    assert not uploaded & set(NOT_PUSHED)


def test_private_by_default(hub: FakeHub, result: Path, tmp_path: Path) -> None:
    push_folder(result, "secret", TOKEN, endpoint=hub.endpoint)
    assert hub.repos["alice/secret"].private

    with pytest.raises(HubError) as info:
        download_repo("alice/secret", endpoint=hub.endpoint, cache_dir=tmp_path / "anon")
    assert str(info.value) == "no model repo 'alice/secret' on the Hub (or it is private and no token was given)"
    with pytest.raises(HubError, match="private and this token cannot read it"):
        download_repo("alice/secret", BOB_TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "bob")
    local = download_repo("alice/secret", TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "alice")
    assert tree(local) == PUSHED


def test_public_push_is_readable_without_token(
    hub: FakeHub, result: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    push_folder(result, "shared", TOKEN, private=False, endpoint=hub.endpoint)
    assert not hub.repos["alice/shared"].private

    # token=None means anonymous: neither HF_TOKEN nor a saved login is sent along.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    seen = len(hub.auth_headers_seen)
    local = download_repo("alice/shared", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert tree(local) == PUSHED
    assert len(hub.auth_headers_seen) == seen


def test_missing_repo_download(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"^no model repo 'alice/nothing' on the Hub"):
        download_repo("alice/nothing", TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path)


def test_pushing_twice_to_the_same_repo(hub: FakeHub, result: Path, tmp_path: Path) -> None:
    push_folder(result, "again", TOKEN, endpoint=hub.endpoint)
    assert hub.commit_count == 1

    # Unchanged files are detected by the client and no empty commit is made.
    assert push_folder(result, "again", TOKEN, endpoint=hub.endpoint) == f"{hub.endpoint}/alice/again"
    assert hub.commit_count == 1

    (result / "unet/config.json").write_bytes(b'{"sample_size": 16}\n')
    push_folder(result, "alice/again", TOKEN, endpoint=hub.endpoint)
    assert hub.commit_count == 2
    local = download_repo("alice/again", TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert tree(local) == {**PUSHED, "unet/config.json": b'{"sample_size": 16}\n'}


def test_repo_owned_by_another_account(hub: FakeHub, result: Path) -> None:
    hub.add_repo("bob/taken", {"README.md": b"bob's model"})

    with pytest.raises(HubError) as info:
        push_folder(result, "bob/taken", TOKEN, endpoint=hub.endpoint)
    assert str(info.value) == "the repo 'bob/taken' exists and this token cannot write to it; choose another name"
    assert info.value.status == 403
    assert hub.repos["bob/taken"].files == {"README.md": b"bob's model"}


@pytest.mark.parametrize("existing", ["none", "private"])
def test_another_namespace_is_not_said_to_exist(hub: FakeHub, result: Path, existing: str) -> None:
    """A 403 under someone else's name says what is known: this token may not create there (a private repo of
    theirs looks the same as no repo at all)."""
    if existing == "private":
        hub.add_repo("bob/taken", {"README.md": b"bob's model"}, private=True)
    with pytest.raises(HubError) as info:
        push_folder(result, "bob/taken", TOKEN, endpoint=hub.endpoint)
    assert str(info.value) == ("this token cannot create a repo under 'bob' (not its account, or an organization "
                               "it may not write to); push under your own name")
    assert info.value.status == 403 and "exists" not in str(info.value)
    assert set(hub.repos) == ({"bob/taken"} if existing == "private" else set())


@pytest.mark.parametrize("how", ["unknown token", "revoked"])
def test_refused_token(hub: FakeHub, result: Path, how: str) -> None:
    token = make_token("nobody") if how == "unknown token" else TOKEN
    hub.refuse_auth = how == "revoked"

    with pytest.raises(HubError, match=r"^The Hugging Face token was refused: ") as info:
        whoami(token, endpoint=hub.endpoint)
    assert info.value.status == 401
    for name in ("bare-name", "alice/with-namespace"):  # with a namespace, create_repo is the first call
        with pytest.raises(HubError, match=r"^The Hugging Face token was refused: .*write access"):
            push_folder(result, name, token, endpoint=hub.endpoint)
    assert hub.repos == {}


def test_failed_commit_keeps_local_result_and_retry_succeeds(hub: FakeHub, result: Path) -> None:
    before = tree(result)
    # 422 because the client itself retries 5xx for ~23 s before giving up.
    hub.fail_next_commits(status=422, message="commit rejected")

    with pytest.raises(HubError, match=r"^push failed: commit rejected; the local result is kept"):
        push_folder(result, "flaky", TOKEN, endpoint=hub.endpoint)
    assert tree(result) == before
    assert hub.repos["alice/flaky"].files == {}

    push_folder(result, "flaky", TOKEN, endpoint=hub.endpoint)
    assert hub.repos["alice/flaky"].files == PUSHED
    assert tree(result) == before


def test_dropped_connection_during_commit_is_retried_by_the_client(hub: FakeHub, result: Path) -> None:
    hub.fail_next_commits(status=None)

    push_folder(result, "dropped", TOKEN, endpoint=hub.endpoint)  # the client waits 1 s, then retries

    assert hub.requests.count(("POST", "/api/models/alice/dropped/commit/main")) == 2
    assert hub.repos["alice/dropped"].files == PUSHED


def test_unreachable_hub(result: Path, tmp_path: Path) -> None:
    endpoint = closed_port_endpoint()
    message = "could not reach the Hub at " + re.escape(endpoint)
    with pytest.raises(HubError, match=rf"^{message}"):
        whoami(TOKEN, endpoint=endpoint)
    with pytest.raises(HubError, match=rf"^{message}.*the local result is kept"):
        push_folder(result, "alice/x", TOKEN, endpoint=endpoint)
    with pytest.raises(HubError, match=rf"^{message}"):
        download_repo("alice/x", endpoint=endpoint, cache_dir=tmp_path)
    assert tree(result) == {**PUSHED, **NOT_PUSHED}


def test_offline_mode_is_reported_as_such(
    hub: FakeHub, result: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for call in (
        lambda: whoami(TOKEN, endpoint=hub.endpoint),
        lambda: push_folder(result, "alice/x", TOKEN, endpoint=hub.endpoint),
        lambda: download_repo("alice/x", endpoint=hub.endpoint, cache_dir=tmp_path),
    ):
        with pytest.raises(HubError, match=r"^the Hub is switched off in this process \(HF_HUB_OFFLINE is set\)"):
            call()
    assert hub.requests == []


def test_token_never_appears_in_errors_logs_or_output(
    hub: FakeHub, result: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    messages: list[str] = []

    def expect_error(call: Callable[..., object], *args: object, **kwargs: object) -> None:
        with pytest.raises(HubError) as info:
            call(*args, **kwargs)
        messages.append(str(info.value))

    push_folder(result, "tokens", TOKEN, endpoint=hub.endpoint)
    download_repo("alice/tokens", TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    # A server whose error text echoes the credentials: the message is scrubbed anyway.
    hub.fail_next_commits(status=400, message=f"bad header: Authorization: Bearer {TOKEN}")
    (result / "README.md").write_bytes(PUSHED["README.md"] + b"changed\n")
    expect_error(push_folder, result, "tokens", TOKEN, endpoint=hub.endpoint)
    hub.add_repo("bob/taken")
    expect_error(push_folder, result, "bob/taken", TOKEN, endpoint=hub.endpoint)
    expect_error(download_repo, "bob/missing", TOKEN, endpoint=hub.endpoint, cache_dir=tmp_path / "c2")
    hub.refuse_auth = True
    expect_error(whoami, TOKEN, endpoint=hub.endpoint)
    expect_error(push_folder, result, "tokens", TOKEN, endpoint=hub.endpoint)
    expect_error(whoami, TOKEN, endpoint=closed_port_endpoint())

    out, err = capfd.readouterr()
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert len(messages) == 6 and "***" in messages[0]
    assert caplog.records and logged.strip()  # the capture really saw the client's debug logging
    assert all("\n" not in message for message in messages)  # one line each, fit for the UI
    for text in [*messages, logged, out, err]:
        assert TOKEN not in text


def test_push_refuses_missing_folder_or_model_card(hub: FakeHub, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(HubError, match="does not exist") as info:
        push_folder(missing, "x", TOKEN, endpoint=hub.endpoint)
    assert str(missing) in str(info.value)

    no_card = tmp_path / "no-card"
    no_card.mkdir()
    (no_card / "learned_embeds.safetensors").write_bytes(b"x")
    with pytest.raises(HubError, match=r"README\.md") as info:
        push_folder(no_card, "x", TOKEN, endpoint=hub.endpoint)
    assert str(no_card) in str(info.value)
    assert hub.requests == []  # refused before any network call


def test_hf_endpoint_is_read_at_call_time(hub: FakeHub, result: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint + "/")
    assert whoami(TOKEN) == "alice"
    assert push_folder(result, "via-env", TOKEN) == f"{hub.endpoint}/alice/via-env"
    assert repo_url("alice/via-env") == f"{hub.endpoint}/alice/via-env"
    monkeypatch.delenv("HF_ENDPOINT")
    assert repo_url("a/b") == "https://huggingface.co/a/b"


def test_resolve_token(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_token(None) is None
    assert resolve_token("  ") is None
    assert resolve_token(f" {TOKEN}\n") == TOKEN
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)
    assert resolve_token(None) == BOB_TOKEN
    assert resolve_token("") == BOB_TOKEN
    assert resolve_token(TOKEN) == TOKEN


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("My Dog", "my-dog"),
        ("  Café Crème brûlée!! ", "cafe-creme-brulee"),
        ("<sks> dog -- lora..v2", "sks-dog-lora.v2"),
        ("日本の猫", "personalized-model"),
        ("", "personalized-model"),
        ("---", "personalized-model"),
        ("model.git", "model"),
        ("already_ok-1.5", "already_ok-1.5"),
    ],
)
def test_slugify_repo_name(text: str, expected: str) -> None:
    assert slugify_repo_name(text) == expected


def test_slugify_long_names_stay_valid() -> None:
    slug = slugify_repo_name("A very long subject name " * 10)
    assert len(slug) <= 96
    assert slug == slug.strip("-_.") and slug.islower()
    from huggingface_hub.utils import validate_repo_id

    for text in ["A very long subject name " * 10, "x" * 200, "-" + "y" * 95 + "-z", "日本の猫", "a..b--c"]:
        validate_repo_id(f"alice/{slugify_repo_name(text)}")


# ---- private repos on a shared server ----------------------------------------------------------------------------
def test_a_private_repo_in_the_shared_cache_is_served_only_to_a_token_the_hub_accepts(
    hub: FakeHub, result: Path, tmp_path: Path
) -> None:
    """Session A downloads a private repo with its token into the server's cache; B (no token), C (a token the Hub
    refuses) and D (a valid token of another account) naming the same repo get an error, never the cached copy."""
    push_folder(result, "secret", TOKEN, endpoint=hub.endpoint)
    shared_cache = tmp_path / "server-cache"
    assert tree(download_repo("alice/secret", TOKEN, endpoint=hub.endpoint, cache_dir=shared_cache)) == PUSHED

    with pytest.raises(HubError, match=r"^no model repo 'alice/secret' .*no token was given"):
        download_repo("alice/secret", None, endpoint=hub.endpoint, cache_dir=shared_cache)
    with pytest.raises(HubError, match=r"^The Hugging Face token was refused: "):
        download_repo("alice/secret", make_token("mallory"), endpoint=hub.endpoint, cache_dir=shared_cache)
    with pytest.raises(HubError, match=r"this token cannot read it"):
        download_repo("alice/secret", BOB_TOKEN, endpoint=hub.endpoint, cache_dir=shared_cache)
    # The owner still gets the files, and a revoked token stops being served at once.
    assert tree(download_repo("alice/secret", TOKEN, endpoint=hub.endpoint, cache_dir=shared_cache)) == PUSHED
    hub.refuse_auth = True
    with pytest.raises(HubError, match=r"^The Hugging Face token was refused: "):
        download_repo("alice/secret", TOKEN, endpoint=hub.endpoint, cache_dir=shared_cache)


def test_a_deleted_repo_is_not_served_from_the_cache(hub: FakeHub, result: Path, tmp_path: Path) -> None:
    push_folder(result, "shared", TOKEN, private=False, endpoint=hub.endpoint)
    download_repo("alice/shared", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    del hub.repos["alice/shared"]
    with pytest.raises(HubError, match=r"^no model repo 'alice/shared'"):
        download_repo("alice/shared", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")


# ---- push_artifact: the card names the repo it is pushed to; the local folder is only read -----------------------
@pytest.fixture
def artifact_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    (folder / "samples").mkdir(parents=True)
    (folder / "README.md").write_text('# x\n```python\npipe.load_lora_weights("YOUR_NAME/THIS_REPO")\n```\n')
    (folder / "pytorch_lora_weights.safetensors").write_bytes(bytes(range(256)) * 8)
    (folder / "samples" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return folder


def test_push_artifact_renders_the_card_for_its_repo_and_never_writes_locally(
    hub: FakeHub, artifact_folder: Path
) -> None:
    before = tree(artifact_folder)
    url = push_artifact(artifact_folder, "Box Lora", TOKEN, endpoint=hub.endpoint)
    assert url == f"{hub.endpoint}/alice/box-lora"
    pushed = hub.repos["alice/box-lora"]
    assert pushed.private
    assert pushed.files["README.md"] == before["README.md"].replace(b"YOUR_NAME/THIS_REPO", b"alice/box-lora")
    assert {k: v for k, v in pushed.files.items() if k != "README.md"} == {
        k: v for k, v in before.items() if k != "README.md"}
    assert tree(artifact_folder) == before


def test_overlapping_pushes_of_one_run_each_name_their_own_repo(hub: FakeHub, artifact_folder: Path) -> None:
    """Two pushes of one run at once (two tabs, or a retry while the first still runs): each repo's card names that
    repo, and the local card keeps its placeholder throughout."""
    from concurrent.futures import ThreadPoolExecutor

    before = tree(artifact_folder)
    names = [f"copy-{index}" for index in range(4)]
    with ThreadPoolExecutor(len(names)) as pool:
        urls = list(pool.map(lambda name: push_artifact(artifact_folder, name, TOKEN, endpoint=hub.endpoint), names))
    assert urls == [f"{hub.endpoint}/alice/{name}" for name in names]
    for name in names:
        card = hub.repos[f"alice/{name}"].files["README.md"].decode()
        assert f'"alice/{name}"' in card and "YOUR_NAME" not in card
        assert not any(f"alice/{other}" in card for other in names if other != name)
    assert tree(artifact_folder) == before


def test_push_artifact_needs_a_card_and_a_token(hub: FakeHub, artifact_folder: Path) -> None:
    with pytest.raises(HubError, match="Pushing needs a Hugging Face token"):
        push_artifact(artifact_folder, "x", "", endpoint=hub.endpoint)
    (artifact_folder / "README.md").unlink()
    with pytest.raises(HubError, match=r"has no README\.md"):
        push_artifact(artifact_folder, "x", TOKEN, endpoint=hub.endpoint)
    assert hub.repos == {}
