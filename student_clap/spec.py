"""The export folder's description (student_clap.json) and the identity of its models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from student_clap.files import sha256_file

EMBED_DIM = 512  # LAION-CLAP's projection width (HTSAT-base audio and RoBERTa text towers alike)
SPEC_FILE = "student_clap.json"


class SearchError(RuntimeError):
    """The exported models, an index or a query cannot be used; the message says which file."""


def load_spec(models_dir: str | Path) -> dict:
    path = Path(models_dir) / SPEC_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SearchError(f"{path}: not found; export the models first (`dvc repro export`) or pass --models") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SearchError(f"{path}: not valid JSON: {exc}") from exc
    except OSError as exc:
        raise SearchError(f"{path}: cannot read ({exc.strerror or exc})") from None


def song_files(audio: dict) -> list[str]:
    """The ONNX files the song path runs (front-end, trunk, head), as named in audio.song."""
    song = audio.get("song") or {}
    return [song.get("frontend_file"), song.get("trunk_file"), song.get("head_file")]


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


def audio_identity(models_dir: str | Path) -> str:
    """sha256 over the song path's ONNX files and the export's audio description: two exports give
    the same identity only when they give the same song vectors. Empty when there is no audio student."""
    models_dir = Path(models_dir)
    audio = load_spec(models_dir).get("audio") or {}
    names = [n for n in song_files(audio) if n]
    if not names:
        return ""
    files = {n: sha256_file(models_dir / n) if (models_dir / n).is_file() else None for n in names}
    return _digest({"files": files, "audio": audio})


def text_identity(models_dir: str | Path) -> str:
    """sha256 over the text ONNX file, its tokenizer and the export's text description ("" without one)."""
    models_dir = Path(models_dir)
    text = load_spec(models_dir).get("text") or {}
    names = [n for n in (text.get("file"), text.get("tokenizer")) if n]
    if not names:
        return ""
    files = {n: sha256_file(models_dir / n) if (models_dir / n).is_file() else None for n in names}
    return _digest({"files": files, "text": text})
