"""Make `import laion_clap` work offline, without touching the user's Hugging Face cache.

laion_clap 1.1.7 loads three tokenizers from the hub when it is imported and the roberta-base
model when a CLAP_Module is built. This module writes a throw-away hub cache in a given folder
holding small stand-ins with the same file layout:

- bert-base-uncased: a WordPiece vocab.txt;
- roberta-base, facebook/bart-base: a small byte-level BPE (vocab.json, merges.txt, tokenizer.json);
- roberta-base also a small RobertaModel (hidden size 768, because laion's text projection
  expects 768 inputs; fewer layers than roberta-base so the test stays fast).

and puts stand-in modules for torchvision (imported by laion_clap but unused on the inference
path) into sys.modules. Environment variables are set by `activate`, which must run before
anything imports huggingface_hub, so the oracle runs in its own process (run_laion.py).
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"
SMALL_ROBERTA = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1024)
_WORDPIECE = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a the of and with in on music song piano guitar drums rock jazz "
    "calm sad happy fast slow dog cat sound ##s ##ing ##ed"
).split()


def snapshot_dir(cache: Path, repo_id: str) -> Path:
    return Path(cache) / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / REVISION


def _snapshot(cache: Path, repo_id: str) -> Path:
    repo = Path(cache) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _write_bpe(snap: Path, tokenizer_class: str) -> int:
    """Byte-level BPE files as the hub repos of roberta-base / bart-base hold them."""
    from pipeline.teacher.model import build_demo_tokenizer, write_tokenizer_config

    tokenizer = build_demo_tokenizer(700)
    tokenizer.model.save(str(snap))  # vocab.json + merges.txt
    tokenizer.save(str(snap / "tokenizer.json"))
    write_tokenizer_config(snap)
    config = json.loads((snap / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = tokenizer_class
    config["model_max_length"] = 512
    (snap / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size()


def build_cache(cache: str | Path, seed: int = 0) -> Path:
    """Write the stand-in hub cache under `cache`/hub; returns `cache`."""
    import torch
    from transformers import RobertaConfig, RobertaModel

    cache = Path(cache)
    bert = _snapshot(cache, "bert-base-uncased")
    (bert / "vocab.txt").write_text("\n".join(_WORDPIECE) + "\n")
    (bert / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": len(_WORDPIECE)}))

    bart = _snapshot(cache, "facebook/bart-base")
    n = _write_bpe(bart, "BartTokenizer")
    (bart / "config.json").write_text(json.dumps({"model_type": "bart", "vocab_size": n}))

    roberta = _snapshot(cache, "roberta-base")
    n = _write_bpe(roberta, "RobertaTokenizer")
    config = RobertaConfig(
        vocab_size=n, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, **SMALL_ROBERTA,
    )
    torch.manual_seed(seed)
    RobertaModel(config).save_pretrained(roberta)
    return cache


def activate(cache: str | Path) -> None:
    """Point the hub at `cache`, offline; must run before huggingface_hub is imported."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("activate() must run before huggingface_hub is imported (use a fresh process)")
    cache = Path(cache)
    os.environ["HF_HOME"] = str(cache)
    os.environ["HF_HUB_CACHE"] = str(cache / "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # transformers probes for torchvision when it is imported: let it find none before the stand-ins go in
    import transformers  # noqa: F401

    install_torchvision_standins()


class _Placeholder:
    """Stands in for a torchvision class that laion_clap imports but never calls at inference."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision stand-in: not available in the laion_clap oracle harness")


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def __getattr__(attr: str):  # any public name resolves to a placeholder class
        if attr.startswith("_"):
            raise AttributeError(attr)
        return type(attr, (_Placeholder,), {})

    module.__getattr__ = __getattr__
    module.__file__ = f"<{name} stand-in>"
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    module.__path__ = []  # a package, so submodule imports work
    return module


def install_torchvision_standins() -> None:
    """torchvision's version must match torch's; laion_clap only needs the names to import."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.ops", "torchvision.ops.misc",
                 "torchvision.datasets"):
        sys.modules[name] = _module(name)
    for name in ("transforms", "ops", "datasets"):
        setattr(sys.modules["torchvision"], name, sys.modules[f"torchvision.{name}"])
    sys.modules["torchvision.ops"].misc = sys.modules["torchvision.ops.misc"]
    try:  # laion_clap.training.data imports pandas at the top but the inference path never uses it
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = _module("pandas")
