"""LAION-CLAP .pt checkpoint -> teacher folder (ClapModel safetensors + config + tokenizer), loaded strictly.
The key mapping and what is dropped on purpose: docs/real-teacher.md."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from pipeline.teacher.model import (
    TeacherError,
    check_tokenizer,
    clap_config,
    htsat_base_audio_config,
    roberta_base_text_config,
    sha256_file,
    write_teacher_dir,
)

log = logging.getLogger(__name__)

_DROPPED = (
    re.compile(r"^audio_branch\.(spectrogram_extractor|logmel_extractor|tscam_conv|head)\."),
    re.compile(r"^audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask$"),
    re.compile(r"^attn_mask$"),
    re.compile(r"^(audio|text)_transform\."),
    re.compile(r"^text_branch\.embeddings\.(position_ids|token_type_ids)$"),
)
# ClapModel buffers the checkpoint need not supply: derived from the config, not learned.
_OWN_BUFFERS = re.compile(r"^text_model\.embeddings\.(position_ids|token_type_ids)$")
_RENAMES = (
    (re.compile(r"^audio_branch\."), "audio_model.audio_encoder."),
    (re.compile(r"^text_branch\."), "text_model."),
    (re.compile(r"^(audio|text)_projection\.0\."), r"\1_projection.linear1."),
    (re.compile(r"^(audio|text)_projection\.2\."), r"\1_projection.linear2."),
    (re.compile(r"\.bn0\."), ".batch_norm."),
    (re.compile(r"(\.blocks\.\d+)\.norm1\."), r"\1.layernorm_before."),
    (re.compile(r"(\.blocks\.\d+)\.norm2\."), r"\1.layernorm_after."),
    (re.compile(r"(\.blocks\.\d+)\.attn\.proj\."), r"\1.attention.output.dense."),
    (re.compile(r"(\.blocks\.\d+)\.attn\.relative_position_"), r"\1.attention.self.relative_position_"),
    (re.compile(r"(\.blocks\.\d+)\.mlp\.fc1\."), r"\1.intermediate.dense."),
    (re.compile(r"(\.blocks\.\d+)\.mlp\.fc2\."), r"\1.output.dense."),
)
_QKV = re.compile(r"^(.*\.blocks\.\d+)\.attn\.qkv\.(weight|bias)$")
_ROBERTA_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id",
    "eos_token_id", "hidden_act",
)


class ConversionError(TeacherError):
    """The checkpoint does not fit the HTSAT-base + RoBERTa ClapModel; the message names the key."""


# --------------------------------------------------------------------------- reading the checkpoint


# Published sha256 of the LAION-CLAP checkpoints this converter is meant for (file name -> digest).
# music_audioset_epoch_15_esc_90.14.pt as served by huggingface.co/lukewys/laion_clap
# (2 352 471 003 bytes, the training checkpoint with its optimiser state).
PUBLISHED_SHA256 = {
    "music_audioset_epoch_15_esc_90.14.pt": "fae3e9c087f2909c28a09dc31c8dfcdacbc42ba44c70e972b58c1bd1caf6dedd",
}


def _allowed_globals() -> list:
    """The few non-tensor classes a LAION training checkpoint's pickle names, all plain data.

    Its epoch record holds numpy scalars, pickled as `numpy.core.multiarray.scalar(dtype, bytes)`;
    numpy 2 moved that function to numpy._core, so it is allowed under its old name too.
    Nothing here can call arbitrary code: anything else in the pickle is refused.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed: list = [core.multiarray.scalar, (core.multiarray.scalar, "numpy.core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a LAION .pt file, `module.` prefix removed.

    Never unpickles arbitrary objects: the file is read with torch's weights-only loader and the
    allow-list above, so a pickle that would call a function is refused, naming the file.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as exc:
        raise ConversionError(
            f"{path}: refused - the file holds objects besides tensors and plain numbers "
            f"({str(exc).splitlines()[0]}). Loading them would run code stored in the file, which "
            "this converter never does; re-save the checkpoint as a plain state_dict of tensors."
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:  # not a zip / truncated / old tar format
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: no state_dict found (expected a LAION-CLAP training checkpoint)")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: state_dict entry {key} is not a tensor")
        out[str(key).removeprefix("module.")] = value
    return out


def verify_checkpoint(path: str | Path, sha256: str | None = None, trust: bool = False) -> dict:
    """Check the file's sha256 against `sha256` or the published digest for its name.

    Returns the provenance fields to record. A mismatch is always an error; a file with nothing
    to compare against is refused unless `trust` (the user vouches for it), and that is recorded.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: checkpoint not found")
    actual = sha256_file(path)
    expected = (sha256 or "").strip().lower() or PUBLISHED_SHA256.get(path.name)
    if expected:
        if actual != expected:
            raise ConversionError(
                f"{path}: sha256 {actual} differs from the expected {expected} (corrupt or a different file)"
            )
        how = "pinned sha256" if sha256 else "published sha256"
        log.info("%s: sha256 matches the %s", path, how)
        return {"source_sha256": actual, "verified": how, "trusted_unverified": False}
    if not trust:
        raise ConversionError(
            f"{path}: no sha256 to verify it against (its sha256 is {actual}). Put that value into "
            "teacher.model.checkpoint_sha256 (or pass --sha256) once you know the file is the one you "
            "meant, or accept it unverified with teacher.model.trust_unverified: true (or --trust)."
        )
    log.warning("%s: used unverified on the user's word (sha256 %s); recorded in teacher.json", path, actual)
    return {"source_sha256": actual, "verified": "no", "trusted_unverified": True}


# --------------------------------------------------------------------------- key mapping


def map_state_dict(laion: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """LAION keys -> ClapModel keys; returns (mapped, dropped source keys, new key -> source key).

    Unknown keys raise ConversionError naming them.
    """
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    origin: dict[str, str] = {}
    for key, value in laion.items():
        if any(p.search(key) for p in _DROPPED):
            dropped.append(key)
            continue
        qkv = _QKV.match(key)
        if qkv:
            if value.shape[0] % 3:
                raise ConversionError(f"{key}: shape {tuple(value.shape)} cannot split into query/key/value")
            base, kind = qkv.groups()
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                new = _rename(f"{base}.attention.self.{name}.{kind}")
                mapped[new], origin[new] = part.clone(), key
            continue
        new = _rename(key)
        if new == key and not key.startswith(("logit_scale_a", "logit_scale_t")):
            raise ConversionError(f"{key}: unknown checkpoint key (not an HTSAT + RoBERTa CLAP checkpoint?)")
        mapped[new], origin[new] = value, key
    return mapped, dropped, origin


def _rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def load_into(model: torch.nn.Module, mapped: dict[str, torch.Tensor], source: str, origin: dict[str, str]) -> None:
    """Strict: same key set (bar derived buffers), same shapes; errors name the key (and `origin`, its source key)."""
    target = model.state_dict()
    unexpected = sorted(set(mapped) - set(target))
    if unexpected:
        names = ", ".join(f"{origin.get(k, k)} (-> {k})" for k in unexpected[:8])
        raise ConversionError(f"{source}: checkpoint keys with no place in the model: {names}")
    missing = sorted(k for k in set(target) - set(mapped) if not _OWN_BUFFERS.match(k))
    if missing:
        raise ConversionError(
            f"{source}: the checkpoint lacks {len(missing)} model weights, e.g. {', '.join(missing[:8])} "
            "(a smaller model than HTSAT-base + this RoBERTa config?)"
        )
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ConversionError(
                f"{source}: {origin.get(key, key)} (-> {key}) has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(target[key].shape)} in the HTSAT-base + RoBERTa model"
            )
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()}, strict=False)


# --------------------------------------------------------------------------- tokenizer


def tokenizer_files_present(tokenizer_dir: str | Path) -> bool:
    d = Path(tokenizer_dir)
    return (d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())


def load_roberta_tokenizer(tokenizer_dir: str | Path):
    """roberta-base's byte-level BPE from tokenizer.json, or built from vocab.json + merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    d = Path(tokenizer_dir)
    if (d / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tokenizer = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")),
            trim_offsets=True, add_prefix_space=False,
        )
    else:
        raise ConversionError(f"{d}: no roberta-base tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    check_tokenizer(tokenizer, d, ConversionError)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def text_config_from(tokenizer_dir: str | Path) -> dict:
    """roberta-base's text config, overridden by the config.json fetched with the tokenizer if present."""
    config = roberta_base_text_config()
    path = Path(tokenizer_dir) / "config.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{path}: not valid JSON: {exc}") from exc
        config.update({k: data[k] for k in _ROBERTA_KEYS if k in data})
    return config


# --------------------------------------------------------------------------- conversion


def convert_checkpoint(
    checkpoint: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    sha256: str | None = None,
    trust: bool = False,
) -> Path:
    """Convert a LAION-CLAP HTSAT-base checkpoint into a teacher folder (see pipeline.teacher.model).

    The file must match `sha256` (or the published digest for its name) unless `trust`.
    """
    from transformers import ClapModel

    checkpoint, tokenizer_dir, out_dir = Path(checkpoint), Path(tokenizer_dir), Path(out_dir)
    verification = verify_checkpoint(checkpoint, sha256, trust)
    tokenizer = load_roberta_tokenizer(tokenizer_dir)
    log.info("reading %s", checkpoint)
    laion = load_checkpoint_state(checkpoint)
    mapped, dropped, origin = map_state_dict(laion)
    log.info("mapped %d checkpoint tensors, dropped %d on purpose", len(laion) - len(dropped), len(dropped))

    config = clap_config(htsat_base_audio_config(), text_config_from(tokenizer_dir))
    model = ClapModel(config).eval()
    load_into(model, mapped, str(checkpoint), origin)
    if tokenizer.get_vocab_size() > config.text_config.vocab_size:
        raise ConversionError(
            f"{tokenizer_dir}: {tokenizer.get_vocab_size()} tokens but the checkpoint's text tower has "
            f"{config.text_config.vocab_size}"
        )
    provenance = {
        "kind": "checkpoint",
        "source": checkpoint.name,
        **verification,
        "tokenizer_source": str(tokenizer_dir),
        "dropped_keys": sorted({re.sub(r"\.\d+\.", ".N.", k) for k in dropped}),
    }
    write_teacher_dir(model, tokenizer, out_dir, provenance)
    log.info("teacher written to %s", out_dir)
    return out_dir


def main(args: argparse.Namespace) -> int:
    """`student-clap teacher convert CKPT --tokenizer DIR --out DIR [--sha256 HEX] [--trust]`."""
    try:
        convert_checkpoint(args.checkpoint, args.tokenizer, args.out, sha256=args.sha256, trust=args.trust)
    except TeacherError as exc:
        log.error("%s", exc)
        return 1
    return 0
