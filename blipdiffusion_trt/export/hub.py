"""Checkpoints from the Hugging Face Hub: ``export Salesforce/blipdiffusion`` downloads what export reads.

A checkpoint argument that is not a directory but a repository id (``org/name``) is fetched with
``huggingface_hub.snapshot_download`` into the standard Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``; ``HF_TOKEN`` for gated or private repositories; ``HF_HUB_OFFLINE=1`` reads only
the cache), with its progress bar, and export then reads the snapshot folder as any checkpoint
folder. Only the files export needs are downloaded: ``model_index.json`` first, then, for each
component it names, the configs, the tokenizer files and the safetensors weights (the pickle
``.bin`` ones only with ``allow_pickle``); the real repository's other folders
(``vision_encoder``, an unused ``controlnet``) and its README are left on the Hub.

diffusers' Q-Former loads its BERT tokenizer from ``qformer/config.json``'s ``tokenizer`` (default
``bert-base-uncased``, a repository of its own): :func:`fetch_qformer_tokenizer` fetches that
repository's tokenizer files the same way before the pipeline loads, so that the load finds them
in the cache.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InputError, first_line

logger = logging.getLogger(__name__)

# diffusers' Blip2QFormerModel loads this tokenizer when the Q-Former's config names none.
DEFAULT_QFORMER_TOKENIZER = "bert-base-uncased"
# A Hub repository id: "name" or "org/name" (letters, digits, "-", "_", "."; no "--" or ".." runs).
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
# Per component folder: what loading it reads.
_COMPONENT_FILES = ("*.json", "*.txt", "*.safetensors")
_PICKLE_FILES = ("*.bin",)
# What a BERT tokenizer's from_pretrained reads (config.json: the model type it checks the class against).
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "config.json")


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text


def resolve_checkpoint(checkpoint: str | Path, *, revision: str | None = None, allow_pickle: bool = False,
                       what: str = "checkpoint") -> Path:
    """A checkpoint folder: ``checkpoint`` itself where it exists, else the snapshot of the Hub
    repository it names (downloaded into the cache, only what export reads)."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        if revision is not None:
            raise InputError(f"--revision {revision}: {checkpoint} is a local folder; --revision is for a Hub "
                             "repository id", field="revision")
        return path
    text = str(checkpoint)
    if not is_repo_id(text):
        raise CheckpointError(f"{what} directory {checkpoint} does not exist")
    index_name = "model_index.json" if what == "checkpoint" else "config.json"
    folder = _download(text, revision, [index_name], what=what, missing_dir=True)
    if what == "checkpoint":
        index = _read_index(folder / index_name, text)
        components = sorted(name for name, value in index.items() if not name.startswith("_")
                            and isinstance(value, list) and len(value) == 2 and all(value))
        patterns = [f"{name}/{pattern}" for name in components
                    for pattern in _COMPONENT_FILES + (_PICKLE_FILES if allow_pickle else ())]
    else:  # a single model (a ControlNet): its files at the top
        patterns = list(_COMPONENT_FILES + (_PICKLE_FILES if allow_pickle else ()))
    # the second download at the commit the first resolved: one revision of every file
    return _download(text, folder.name, [index_name, *patterns], what=what)


def fetch_qformer_tokenizer(checkpoint: Path) -> None:
    """Fetch the tokenizer repository ``qformer/config.json`` names (default ``bert-base-uncased``)
    into the Hugging Face cache, its tokenizer files only; nothing for a folder reference."""
    config_path = checkpoint / "qformer" / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return  # the checkpoint's own checks report a missing or broken config
    reference = config.get("tokenizer") or DEFAULT_QFORMER_TOKENIZER
    if not isinstance(reference, str) or Path(reference).expanduser().is_dir():
        return
    if not is_repo_id(reference):
        raise CheckpointError(f"{config_path}: tokenizer {reference!r} is neither a folder nor a Hub repository id")
    _download(reference, None, list(_TOKENIZER_FILES), what=f"Q-Former tokenizer (tokenizer of {config_path})")


def _read_index(path: Path, repo: str) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{repo}: model_index.json cannot be read ({first_line(error)}): is this a "
                              "diffusers checkpoint?") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{repo}: model_index.json is not a JSON object")
    return index


def _download(repo: str, revision: str | None, patterns: list[str], *, what: str, missing_dir: bool = False) -> Path:
    """``snapshot_download`` of ``patterns``; its errors become one line naming the repository and revision."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                           RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise CheckpointError(f"{repo}: downloading from the Hub needs huggingface_hub "
                              "(pip install 'blipdiffusion-trt[export]')") from None
    at = f"{repo}@{revision}" if revision else repo
    local = " (nor a folder of that name)" if missing_dir and not revision else ""
    try:
        logger.info("fetching %s from the Hugging Face Hub: %s", what, ", ".join(patterns))
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise CheckpointError(f"{at}: a gated repository; accept its terms on the Hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{at}: no revision {revision!r} in the Hub repository {repo}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{at}: no such {what} repository on the Hugging Face Hub{local} (a private one "
                              "needs HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{at}: not in the Hugging Face cache{local}, and the Hub cannot be reached "
                              "(HF_HUB_OFFLINE=1, or no network)") from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"{at}: the Hub refused the download ({first_line(error)})") from None
    except OSError as error:
        raise CheckpointError(f"{at}: download failed ({first_line(error)})") from None
