"""Fetching released weights through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE, revisions)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .checkpoints import CheckpointError


class WeightsNotAvailableError(CheckpointError):
    """The weights are neither reachable on the Hub nor in the local cache."""


def split_revision(hf_hub_id: str) -> tuple:
    """'org/name@rev' -> ('org/name', 'rev'); timm's spelling of a pinned revision."""
    repo_id, _, revision = hf_hub_id.partition("@")
    return repo_id, (revision or None)


def download(hf_hub_id: str, filename: str, revision: Optional[str] = None,
             cache_dir: Optional[Union[str, Path]] = None, force: bool = False) -> Path:
    """Path of `filename` from Hub repository `hf_hub_id` in the local cache, downloading it if needed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, pinned = split_revision(hf_hub_id)
    revision = revision or pinned
    where = f"{filename} from the Hugging Face Hub repository {repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename=filename, revision=revision, cache_dir=cache_dir,
                                    force_download=force))
    except LocalEntryNotFoundError as e:
        raise WeightsNotAvailableError(
            f"cannot get {where}: there is no network connection (or HF_HUB_OFFLINE=1) and the file is not in the "
            f"local cache ({cache_dir or 'HF_HOME'}). Download it once on a machine with network access "
            f"(`flexpredict-zoo download MODEL`, then copy the HF_HOME cache), or pass a local file with "
            f"timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH)).") from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise WeightsNotAvailableError(f"cannot get {where}: {type(e).__name__}. Check the repository, file name "
                                       f"and revision in weights_manifest.json.") from e
    except HfHubHTTPError as e:
        raise WeightsNotAvailableError(f"cannot get {where}: the Hub answered {e}. Try again later, or pass a local "
                                       f"file with pretrained_cfg_overlay=dict(file=PATH).") from e
