"""Parity with the oracle: laion_clap 1.1.7 and our converted ClapModel give the same embeddings.

A randomly initialised HTSAT-base + RoBERTa CLAP_Module from laion_clap itself is saved in the
original checkpoint format; laion_clap loads it (load_ckpt) and embeds 10-s waveforms and texts;
we convert the same file and embed through pipeline.data.frontends.TeacherMel and pipeline.teacher.model.
laion_clap runs in a subprocess with the offline harness in tests/laion_oracle/.

laion_clap is a test-only dependency; install it without its pins (numpy<2) with
    pip install --no-deps laion_clap==1.1.7 torchlibrosa==0.1.0 ftfy braceexpand webdataset wget
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from repo_params import section

HERE = Path(__file__).resolve().parent
MIN_COSINE = 0.9999
TEXTS = [
    "a calm piano song",
    "Jazz, SAXOPHONE, relaxed",
    "energetic rock with electric guitar and drums",
    "x",
    "music " * 100,  # longer than 77 tokens: truncation must match
    "ünïcödé — café",
]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("laion_clap") is None,
    reason="laion_clap not installed (test-only oracle): "
    "pip install --no-deps laion_clap==1.1.7 torchlibrosa==0.1.0 ftfy braceexpand webdataset wget",
)]


def _waves(seconds: float = 10.0, sr: int = 48000) -> np.ndarray:
    """Varied 10-s test signals: tone + noise, loud clipped noise, a chirp, near silence."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    chirp = np.sin(2 * np.pi * (100 + 2000 * t / seconds) * t)
    beat = np.sign(np.sin(2 * np.pi * 2 * t)) * np.sin(2 * np.pi * 220 * t)
    waves = [
        0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size),
        1.5 * rng.standard_normal(t.size),  # clips at +-1 in the int16 round trip
        0.4 * chirp + 0.2 * beat,
        1e-4 * rng.standard_normal(t.size),
    ]
    return np.asarray(waves, dtype=np.float32)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    sys.path.insert(0, str(HERE))
    from laion_oracle import hf_cache

    work = tmp_path_factory.mktemp("oracle")
    cache = hf_cache.build_cache(work / "hf")
    np.save(work / "waves.npy", _waves())
    (work / "texts.json").write_text(json.dumps(TEXTS))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONPATH="")
    for key in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE"):
        env.pop(key, None)  # the harness sets them to the throw-away cache
    proc = subprocess.run(
        [sys.executable, str(HERE / "laion_oracle" / "run_laion.py"), str(cache), str(work)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(f"laion_clap oracle failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    ref = np.load(work / "laion.npz")
    snapshot = hf_cache.snapshot_dir(cache, "roberta-base")
    return {"work": work, "audio": ref["audio"], "text": ref["text"], "tokenizer_dir": snapshot}


@pytest.fixture(scope="module")
def teacher(oracle: dict):
    from pipeline.teacher.convert import convert_checkpoint
    from pipeline.teacher.model import load_teacher

    # a checkpoint this test built itself: nothing published to check it against
    out = convert_checkpoint(
        oracle["work"] / "laion_ckpt.pt", oracle["tokenizer_dir"], oracle["work"] / "teacher", trust=True
    )
    return load_teacher(out)


def test_audio_embeddings_match_laion_clap(oracle: dict, teacher) -> None:
    from pipeline.data.frontends import TeacherMel
    from student_clap.audio import int16_to_float, to_int16

    waves = int16_to_float(to_int16(_waves()))  # what student_clap.audio.decode hands the mel stage
    mels = TeacherMel(section("frontend.teacher"))(torch.from_numpy(waves))
    assert tuple(mels.shape) == (len(waves), 1001, 64)
    ours = teacher.embed_mels(mels).numpy()
    cosine = (ours * oracle["audio"]).sum(axis=1) / np.linalg.norm(oracle["audio"], axis=1)
    assert cosine.min() >= MIN_COSINE, f"audio cosine per clip: {cosine}"
    # the clips give clearly different embeddings, so the agreement above is not a constant output
    assert (ours @ ours.T)[np.triu_indices(len(ours), 1)].min() < 0.99


def test_text_embeddings_match_laion_clap(oracle: dict, teacher) -> None:
    ours = teacher.embed_text(TEXTS).numpy()
    cosine = (ours * oracle["text"]).sum(axis=1) / np.linalg.norm(oracle["text"], axis=1)
    assert cosine.min() >= MIN_COSINE, f"text cosine per query: {cosine}"
    # and the texts really differ, so agreement is not a constant output
    assert (ours @ ours.T)[np.triu_indices(len(TEXTS), 1)].min() < 0.99999
