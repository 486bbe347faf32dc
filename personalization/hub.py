"""Transfers to and from the Hugging Face Hub: the only module that talks to the Hub.

Every call builds its own `HfApi(endpoint=..., token=...)`: huggingface_hub's module-level helpers freeze the
endpoint at import time, which would ignore an `HF_ENDPOINT` set later (tests, mirrors). Errors come out as
`HubError` with a one-line message fit for the UI, never containing the token.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import httpx2  # huggingface_hub 2.x's HTTP client; its transport errors mean "could not reach the Hub"
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from .artifacts import CARD_FILE, scratch_beside

DEFAULT_ENDPOINT = "https://huggingface.co"
FALLBACK_REPO_NAME = "personalized-model"
DEFAULT_COMMIT_MESSAGE = "Upload personalized model"
MAX_REPO_NAME_LENGTH = 96

# Applied by huggingface_hub with fnmatch on the path relative to the folder, where "*" also crosses "/";
# each pattern is given at the root and one level (or more) down.
PUSH_IGNORE_PATTERNS: list[str] = [
    "checkpoint*/*", "*/checkpoint*/*",  # training checkpoints (checkpoint-100/, checkpoints/)
    "optimizer*", "*/optimizer*",  # optimizer state (optimizer.pt, optimizer.bin, ...)
    "random_states_*.pkl", "*/random_states_*.pkl", "scaler.pt", "*/scaler.pt",  # accelerate save_state leftovers
    "*.tmp",
    ".*", "*/.*",  # hidden files and folders
]

_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}|(?i:bearer)\s+\S+")
_MAX_REASON = 200


class HubError(Exception):
    """A failed Hub operation, with a one-line, user-readable message that never contains the token.

    `status` is the HTTP status the Hub answered, when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def resolve_token(explicit: str | None) -> str | None:
    """Return the token to use: `explicit` stripped (empty counts as absent), else env `HF_TOKEN`, else None."""
    for candidate in (explicit, os.environ.get("HF_TOKEN")):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


def slugify_repo_name(text: str) -> str:
    """Return a valid Hub repo name made from `text`.

    Lowercase, only [a-z0-9-_.], no leading/trailing separator, no "--"/".." runs, no ".git" ending, at most
    96 characters;
    falls back to "personalized-model" when nothing usable is left.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_text)
    slug = re.sub(r"[-_.]*([-_.])[-_.]*", r"\1", slug)  # the Hub refuses "--" and ".." runs
    slug = slug[:MAX_REPO_NAME_LENGTH].strip("-_.")
    slug = slug.removesuffix(".git").strip("-_.")  # "x.git" is reserved for the git remote
    return slug or FALLBACK_REPO_NAME


def repo_url(repo_id: str, endpoint: str | None = None) -> str:
    """Return the web URL of model repo `repo_id` on `endpoint` (default: env HF_ENDPOINT, else huggingface.co)."""
    return f"{_endpoint(endpoint)}/{repo_id}"


def whoami(token: str, *, endpoint: str | None = None) -> str:
    """Return the user name that `token` belongs to.

    Raises HubError("The Hugging Face token was refused: ...") when the Hub rejects the token.
    """
    return _whoami(token, _endpoint(endpoint), action="checking the token")


def _whoami(token: str, endpoint: str, *, action: str) -> str:
    if not token:
        raise HubError("A Hugging Face token is needed; log in or paste a token with write access.")
    try:
        info = HfApi(endpoint=endpoint, token=token).whoami(token=token)
    except Exception as err:
        raise _to_hub_error(err, endpoint=endpoint, token=token, action=action) from None
    name = info.get("name") if isinstance(info, dict) else None
    if not name:
        raise HubError(f"The Hub at {endpoint} did not say who owns this token.")
    return str(name)


def resolve_repo_id(name: str, token: str, *, endpoint: str | None = None) -> str:
    """The repo id a push goes to: `namespace/name` as given (the name made valid), a bare name under the token
    owner's account (one `whoami` call)."""
    name = name.strip().strip("/")
    namespace, _, bare = name.rpartition("/")
    if not namespace:
        namespace = _whoami(token, _endpoint(endpoint), action="push")
    return f"{namespace}/{slugify_repo_name(bare)}"


def push_artifact(folder: Path, repo: str, token: str, *, private: bool = True, endpoint: str | None = None,
                  include_checkpoints: bool = False) -> str:
    """Push an artifact folder to model repo `repo` (bare name or `namespace/name`) and return the repo's URL.

    The model card is rendered for that repo in the upload itself: the local folder is only read, so a crash or two
    overlapping pushes can never leave a local card (or another repo's card) naming the wrong repo.
    ``include_checkpoints``: push ``checkpoints/`` too (left out by default: only the kept step is the model).
    """
    from .model_card import card_for_repo  # the card module imports the training stack; pushing alone need not

    folder = Path(folder)
    _check_pushable(folder, token)
    repo_id = resolve_repo_id(repo, token, endpoint=endpoint)
    return _upload(folder, repo_id, token, private=private, endpoint=_endpoint(endpoint),
                   commit_message=DEFAULT_COMMIT_MESSAGE, replaced_files={CARD_FILE: card_for_repo(folder, repo_id)},
                   ignore_patterns=_push_ignore_patterns(include_checkpoints))


def push_folder(
    folder: Path,
    repo_name_or_id: str,
    token: str,
    *,
    private: bool = True,
    endpoint: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """Upload `folder` to a model repo on the Hub, creating the repo if needed; return the repo's URL.

    A bare name is put under the token owner's account. Checkpoint folders, optimizer state, `*.tmp` and hidden
    files are left out. The local folder is only read, so a failed push can simply be retried.
    `private` only applies when the repo is created; an existing repo keeps its visibility.
    """
    folder = Path(folder)
    _check_pushable(folder, token)
    endpoint = _endpoint(endpoint)
    repo_id = resolve_repo_id(repo_name_or_id, token, endpoint=endpoint)
    return _upload(folder, repo_id, token, private=private, endpoint=endpoint, commit_message=commit_message,
                   replaced_files={})


def _push_ignore_patterns(include_checkpoints: bool) -> list[str]:
    if not include_checkpoints:
        return list(PUSH_IGNORE_PATTERNS)
    return [pattern for pattern in PUSH_IGNORE_PATTERNS if "checkpoint" not in pattern]


def _upload(folder: Path, repo_id: str, token: str, *, private: bool, endpoint: str, commit_message: str,
            replaced_files: dict[str, bytes], ignore_patterns: list[str] | None = None) -> str:
    """Create the repo if needed and upload `folder`, `replaced_files` (path in repo -> content) standing in for
    the local files of those names; the checks and the repo id are the caller's."""
    api = HfApi(endpoint=endpoint, token=token)
    try:
        _create_repo_if_missing(api, repo_id, private=private)
        with _upload_view(folder, replaced_files) as view:
            api.upload_folder(repo_id=repo_id, folder_path=view, repo_type="model", commit_message=commit_message,
                              ignore_patterns=ignore_patterns or list(PUSH_IGNORE_PATTERNS), token=token)
    except Exception as err:
        raise _to_hub_error(err, endpoint=endpoint, token=token, action="push", repo_id=repo_id) from None
    return repo_url(repo_id, endpoint)


def _check_pushable(folder: Path, token: str | None) -> None:
    if not folder.is_dir():
        raise HubError(f"Cannot push '{folder}': the folder does not exist.")
    if not (folder / CARD_FILE).is_file():
        raise HubError(f"Cannot push '{folder}': it has no {CARD_FILE} (model card).")
    if not token:
        raise HubError("Pushing needs a Hugging Face token with write access; log in or paste one.")


@contextlib.contextmanager
def _upload_view(folder: Path, replaced_files: dict[str, bytes]) -> Iterator[Path]:
    """`folder` as it is to be uploaded: itself, or a hidden scratch copy beside it (hard links) with `replaced_files`
    written in. upload_folder (resumable, retried) only takes a folder, and the local one must not be rewritten; a
    kill mid-push leaves only a scratch folder that the next write or session cleaning removes."""
    if not replaced_files:
        yield folder
        return
    with scratch_beside(folder) as view:
        for source in sorted(folder.rglob("*")):
            relative = source.relative_to(folder).as_posix()
            if relative in replaced_files or source.is_symlink() or not source.is_file():
                continue  # links are never followed: a run folder holds only what the trainer wrote
            target = view / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:  # a file system without hard links
                shutil.copyfile(source, target)
        for relative, content in replaced_files.items():
            (view / relative).parent.mkdir(parents=True, exist_ok=True)
            (view / relative).write_bytes(content)  # a new file: never written through a link to the original
        yield view


def download_repo(
    repo_id: str,
    token: str | None = None,
    *,
    endpoint: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Download every file of model repo `repo_id` and return the local snapshot folder.

    `token=None` downloads anonymously (a token saved on the machine is not used; see `resolve_token`).
    The Hub is asked first, on every call, whether this token may read the repo: `snapshot_download` alone answers
    a refused token or a private repo from the cache when the Hub says 401/404, which on a shared server would hand
    one user's private model to anyone naming it. Files already in the cache are not fetched again.
    """
    endpoint = _endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        revision = api.repo_info(repo_id, repo_type="model", token=token or False).sha
        path = api.snapshot_download(
            repo_id=repo_id, repo_type="model", revision=revision, cache_dir=cache_dir, token=token or False
        )
    except Exception as err:
        raise _to_hub_error(err, endpoint=endpoint, token=token, action="download", repo_id=repo_id) from None
    return Path(path)


def _create_repo_if_missing(api: HfApi, repo_id: str, *, private: bool) -> None:
    # Same outcome as create_repo(exist_ok=True), whose 401/402/403 fallback builds RepoUrl without the endpoint
    # and so fails with "Invalid HF URI" on any endpoint other than the one HF_ENDPOINT named at import.
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=False)
    except HfHubHTTPError as err:
        status = err.response.status_code
        if status == 409:
            return  # it exists and is ours
        if status not in (402, 403):
            raise
        # A token may write to an existing repo without being allowed to create one; the upload will tell.
        try:
            api.repo_info(repo_id, repo_type="model")
        except HfHubHTTPError:
            namespace = repo_id.split("/")[0]
            raise HubError(f"this token cannot create a repo under '{namespace}' (not its account, or an "
                           "organization it may not write to); push under your own name", status=status) from None


def _endpoint(endpoint: str | None) -> str:
    # Read HF_ENDPOINT at call time, unlike huggingface_hub.constants which froze it at import.
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _sanitize(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("***", text)


def _short_reason(err: BaseException) -> str:
    if isinstance(err, HfHubHTTPError):
        reason = err.server_message or f"HTTP {err.response.status_code}"
    else:
        reason = str(err) or type(err).__name__
    reason = " ".join(reason.split())  # one line
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 3] + "..."


def _to_hub_error(
    err: BaseException, *, endpoint: str, token: str | None, action: str, repo_id: str | None = None
) -> HubError:
    """Map anything huggingface_hub raised to a one-line HubError; the token is scrubbed as a last defence."""
    if isinstance(err, HubError):
        return HubError(_sanitize(str(err), token), status=err.status)
    status = err.response.status_code if isinstance(err, HfHubHTTPError) else None
    # snapshot_download wraps an unreachable (or switched-off) Hub into LocalEntryNotFoundError when nothing is
    # cached; the wrapped error says more than its long multi-line message.
    cause = err.__cause__ if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None else err
    reason = _short_reason(cause)
    kept = "; the local result is kept, try again" if action == "push" else ""
    if isinstance(cause, OfflineModeIsEnabled):
        message = f"the Hub is switched off in this process (HF_HUB_OFFLINE is set){kept}"
    elif isinstance(cause, httpx2.TransportError) or isinstance(err, LocalEntryNotFoundError):
        message = f"could not reach the Hub at {endpoint} ({reason}){kept}"
    elif action == "download" and isinstance(err, GatedRepoError):
        message = f"the repo '{repo_id}' is gated: accept its conditions on the Hub with this account first"
    elif status == 401 and not isinstance(err, RepositoryNotFoundError):
        said = f" ({err.server_message})" if isinstance(err, HfHubHTTPError) and err.server_message else ""
        need = "is valid and has write access" if action == "push" else "is valid"
        message = (
            f"The Hugging Face token was refused: the Hub at {endpoint} answered 401{said}; "
            f"check that it {need} ({endpoint}/settings/tokens)"
        )
    elif action == "download" and isinstance(err, RepositoryNotFoundError):
        why = "no token was given" if not token else "this token cannot read it"
        message = f"no model repo '{repo_id}' on the Hub (or it is private and {why})"
    elif action == "push" and status in (403, 409):  # the repo exists (see _create_repo_if_missing)
        message = f"the repo '{repo_id}' exists and this token cannot write to it; choose another name"
    elif action == "push":
        message = f"push failed: {reason}{kept}"
    else:
        message = f"{action} failed: {reason}"
    return HubError(_sanitize(message, token), status=status)
