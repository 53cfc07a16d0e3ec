"""Uploading an exported folder to the Hugging Face Hub (``HfApi.create_repo`` + ``upload_folder``).

Everything that can be refused is checked before any work: a malformed repository id, a missing
token, no network. The token is read from the environment variable ``hub.token_env`` names, handed
to ``huggingface_hub`` and nothing else: it is never printed, logged or written to a file (an
error message that might quote it has it masked first).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from constitutional_ai.artifacts.table import ARTIFACTS
from constitutional_ai.common.errors import CAIError, ConfigError, first_line
from constitutional_ai.common.hub import hub_offline_reason, quiet_hub_logs
from constitutional_ai.config import HubConfig

FLAG = "--push-to-hub"


class PushError(CAIError):
    """The Hub refused or could not be reached; the exported folder is still there to push later."""


@dataclass(frozen=True)
class Pushed:
    name: str
    repo_id: str
    url: str
    private: bool


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return bool(name)


def is_hub_model(name: str) -> bool:
    """A model named by its Hub id (``Qwen/Qwen2.5-1.5B``), not a local folder or an ``embedded:`` model:
    only such a name may be a card's ``base_model`` (the Hub refuses a card naming anything else)."""
    return _valid_repo_id(name) and not Path(name).expanduser().exists()


def check_repo_id(repo_id: str, flag: str = FLAG) -> str:
    """``repo_id`` when it is ``namespace/name``; else a one-line error saying what to pass."""
    if repo_id.count("/") != 1 or not _valid_repo_id(repo_id):
        raise ConfigError(f"{flag} {repo_id!r}: not a Hub repository id; pass NAMESPACE/NAME (your user or "
                          "organisation, then letters, digits, '-', '_' or '.', no '--' or '..'), e.g. me/cai-sft")
    return repo_id


def repo_ids(push_to_hub: str, names: Iterable[str], prefix: bool) -> dict[str, str]:
    """The repository of each artifact: ``push_to_hub`` itself for one artifact of a stage command,
    ``PREFIX-<artifact>`` (``me/cai-demo-sft-model``) for ``cai export`` or several artifacts."""
    names = list(names)
    if not prefix and len(names) == 1:
        return {names[0]: check_repo_id(push_to_hub)}
    check_repo_id(push_to_hub)
    return {n: check_repo_id(f"{push_to_hub}-{ARTIFACTS[n].slug}", f"{FLAG} {push_to_hub!r} for {n}") for n in names}


def hub_token(hub: HubConfig) -> str:
    """The token from ``$hub.token_env``; a one-line error naming the variable when it is unset."""
    token = os.environ.get(hub.token_env, "").strip()
    if not token:
        raise ConfigError(f"hub.token_env: the environment variable {hub.token_env} is not set; export a Hub token "
                          f"with write access (https://huggingface.co/settings/tokens) as {hub.token_env}, or "
                          "name another variable with --hub.token_env")
    return token


def check_push(hub: HubConfig, names: Iterable[str], prefix: bool) -> dict[str, str]:
    """Everything a push needs that costs nothing to check (run before exporting or training):
    the repository ids and the token. Returns the repository of each artifact."""
    if not hub.push_to_hub:
        return {}
    ids = repo_ids(hub.push_to_hub, names, prefix)
    hub_token(hub)
    return ids


def push_folder(folder: Path, name: str, repo_id: str, hub: HubConfig) -> Pushed:
    """Create ``repo_id`` (private unless ``hub.private`` is off; an existing one is reused) and upload
    ``folder`` to it in one commit."""
    from huggingface_hub import HfApi

    artifact = ARTIFACTS[name]
    token = hub_token(hub)
    reason = hub_offline_reason()
    if reason is not None:
        raise PushError(f"cannot push {name} to {repo_id}: {reason}; the folder is ready at {folder}: push it "
                        f"once online with `hf upload {repo_id} {folder} --repo-type {artifact.repo_type}` "
                        "(or `cai export --push-to-hub PREFIX`)")
    api = HfApi()
    try:
        with quiet_hub_logs():
            url = api.create_repo(repo_id, token=token, private=hub.private, repo_type=artifact.repo_type,
                                  exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=artifact.repo_type, token=token,
                              commit_message=f"cai export: {artifact.title} ({name})")
    except CAIError:
        raise
    except Exception as exc:  # HTTP 401/403/409, a dropped connection: one line, the token masked
        message = first_line(exc).replace(token, "***")
        raise PushError(f"pushing {name} to {repo_id} failed: {message}; check that {hub.token_env} holds a token "
                        f"with write access to {repo_id.split('/')[0]}, then rerun (the folder is at {folder})"
                        ) from None
    return Pushed(name, repo_id, str(url), hub.private)
