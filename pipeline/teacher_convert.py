"""LAION-CLAP .pt checkpoint -> teacher folder (ClapModel safetensors + config + tokenizer)."""

from __future__ import annotations

from pathlib import Path


def tokenizer_files_present(tokenizer_dir: str | Path) -> bool:
    d = Path(tokenizer_dir)
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())
