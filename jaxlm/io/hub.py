"""Paths that name models: a local directory, or a Hugging Face hub id fetched into the cache."""

from __future__ import annotations

from pathlib import Path

from jaxlm.tokenizer import TOKENIZER_FILES


def local_dir(path) -> Path:
    """``path`` itself if it exists, else a Hugging Face hub id fetched into the local cache."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise NotADirectoryError(f"{p} is a file; expected a model directory")
        return p
    if p.is_absolute() or str(path).startswith(".") or str(path).count("/") > 1:
        raise FileNotFoundError(f"{path} does not exist")
    try:
        from huggingface_hub import snapshot_download  # lazy (~0.3 s): only for hub ids

        return Path(snapshot_download(str(path), allow_patterns=[
            "config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]))
    except Exception as e:  # no hub client, no network, unknown repo
        raise FileNotFoundError(
            f"{path} is not a local directory and could not be fetched from the Hugging Face hub"
            f" ({type(e).__name__})") from None

