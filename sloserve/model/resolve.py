"""Where a model lives: a local directory, or a Hugging Face hub id found in the local cache or downloaded."""
from __future__ import annotations

import json
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

# What a model needs of a hub repository: config, weights, tokenizer, chat template (not other formats).
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def resolve_model_dir(model: str, revision: str | None = None, download_dir: str | None = None, *,
                      need_config: bool = True) -> Path:
    """A local directory as it is; otherwise a hub id, from the cache first, then downloaded when online."""
    path = Path(model).expanduser()
    if path.is_dir():
        if need_config and not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
        return path
    if not _REPO_ID.match(model) or model.startswith((".", "~")):
        raise FileNotFoundError(f"{model} is not a Hugging Face model directory (no such directory)")
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True,
                                      allow_patterns=_ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, HFValidationError) as error:
        cached_error = error
    cache = download_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{model!r} is not a local directory and not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE "
            f"is set, so it cannot be downloaded: download it where the hub is reachable "
            f"(`hf download {model}`) or pass a model directory"
        ) from cached_error
    try:
        return Path(snapshot_download(model, revision=revision, cache_dir=download_dir, allow_patterns=_ALLOW_PATTERNS))
    except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise FileNotFoundError(
            f"{model!r} is not a local directory and not in the Hugging Face cache ({cache}); downloading it "
            f"failed: {error}. Pass a model directory, or download it ahead (`hf download {model}`)"
        ) from None


def custom_code_of(model_dir: Path) -> list[str]:
    """The classes a model's config maps to the repository's own Python code (auto_map): never run here."""
    return sorted(json.loads((model_dir / "config.json").read_text()).get("auto_map") or {})
