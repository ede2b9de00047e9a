"""Upload a folder written by `flexpredict-zoo convert` to the Hugging Face Hub, with a generated model card."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from .atomic_write import write_file_atomically
from .checkpoints import SAFETENSORS_NAME, CheckpointError
from .convert import CONFIG_NAME, flexpredict_architecture, folder_lock, read_export, timm_native_copy
from .model_card import render_hub_card

README_NAME = "README.md"
UPLOADED_FILES = (SAFETENSORS_NAME, CONFIG_NAME, README_NAME)


def write_hub_card(folder: Union[str, Path], repo_id: str) -> Path:
    """(Re)write README.md in `folder` from its config.json and safetensors metadata; return its path."""
    folder = Path(folder).expanduser()
    config, metadata = read_export(folder)
    if not str(flexpredict_architecture(config)[0]).startswith("flexpredict_"):
        raise CheckpointError(f"{folder / CONFIG_NAME} describes {config.get('architecture')!r}, not a FlexPredict "
                              f"model; push folders written by `flexpredict-zoo convert`")
    text = render_hub_card(config, metadata, repo_id)
    return write_file_atomically(folder / README_NAME, lambda temp: temp.write_text(text))


def push_to_hub(folder: Union[str, Path], repo_id: str, private: bool = False, revision: Optional[str] = None,
                commit_message: str = "Add FlexPredict backbone (flexpredict-zoo convert)",
                token: Optional[str] = None, timm_native: bool = False) -> Any:
    """Create `repo_id` if needed and upload model.safetensors, config.json and a generated README.md.

    Afterwards `timm.create_model("hf-hub:" + repo_id, pretrained=True)` loads the model (with flexpredict_zoo
    imported; without it for a timm-native folder). `timm_native`: upload the timm-native form; a plugin folder
    is rewritten into a temporary folder for that (`convert.timm_native_copy`) and left as it is. The folder's
    lock (`convert.folder_lock`) is held from reading it to the end of the upload, so a conversion or export into
    it meanwhile is refused. Returns huggingface_hub's commit info.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like ORG/NAME, got {repo_id!r}")
    folder = Path(folder).expanduser()
    with folder_lock(folder):  # also removes a killed push's temporary copy (this folder's only)
        config, _ = read_export(folder)
        if timm_native and "flexpredict" not in config:
            # beside the folder, on the disk the user chose for weights (a ViT-H copy is 2.5 GB), named as the
            # atomic writers name their temporaries, so the next run on this folder removes it if we are killed
            with tempfile.TemporaryDirectory(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent) as tmp:
                native = timm_native_copy(folder, Path(tmp) / folder.name)
                return _upload(native, repo_id, private, revision, commit_message, token)
        return _upload(folder, repo_id, private, revision, commit_message, token)


def _upload(folder: Path, repo_id: str, private: bool, revision: Optional[str], commit_message: str,
            token: Optional[str]) -> Any:
    from huggingface_hub import HfApi

    write_hub_card(folder, repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=list(UPLOADED_FILES),
                             commit_message=commit_message, revision=revision, repo_type="model")
