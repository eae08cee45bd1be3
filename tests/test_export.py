"""export: waveform/mel/int8 audio ONNX and text ONNX with parity, checksums and the model card.

Small shapes keep it quick: a 1-s segment at 16 kHz through a conv front-end stands in for the
10-s EfficientAT mel in the export plumbing tests; the stage test with the real front-end runs
when pipeline.data.frontends is present.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.models import model_card
from pipeline.models import audio_export, song_export
from pipeline.models import onnx_export as onnx_utils
from pipeline.models.audio_student import build_audio_student
from pipeline.models.text_student import build_text_student
from pipeline.stages import export as stage
from pipeline.data.text_tokenizer import save_tokenizer, train_tokenizer
from repo_params import repo_params

torch.set_num_threads(1)
SR, SEG = 16000, 16000


class ConvMel(torch.nn.Module):
    """A learnt-filterbank log-energy front-end: wave [B, N] -> [B, 128, frames]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.filters = torch.nn.Conv1d(1, 128, kernel_size=400, stride=160, bias=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.log(self.filters(wave.unsqueeze(1)) ** 2 + 1e-5)


@pytest.fixture(scope="module")
def audio_student():
    torch.manual_seed(0)
    return build_audio_student({"backbone": "mn04_as", "dropout": 0.1}).eval()


@pytest.fixture(scope="module")
def text_parts(tmp_path_factory):
    corpus = [f"{a} {b} music" for a in ("calm", "energetic", "sad", "happy") for b in ("piano", "guitar", "drums")] * 3
    tok = train_tokenizer(corpus, vocab_size=300)
    path = save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer.json")
    torch.manual_seed(0)
    model = build_text_student(
        {"vocab_size": tok.get_vocab_size(), "dim": 32, "layers": 1, "heads": 2, "ff_dim": 64, "max_length": 12, "dropout": 0.1}
    ).eval()
    return model, path


def test_waveform_mel_and_int8_exports(tmp_path: Path, audio_student):
    info = audio_export.export_audio(audio_student, ConvMel(), tmp_path, segment_samples=SEG, sample_rate=SR,
                                     opset=17, min_cosine=0.9999, quantize=True)
    assert info[audio_export.AUDIO_ONNX]["min_cosine"] > 0.9999
    assert info[audio_export.AUDIO_MEL_ONNX]["min_cosine"] > 0.9999
    assert info["mel_shape"][0] == 128
    assert 0.99 < info[audio_export.AUDIO_INT8_ONNX]["cosine_min"] < 1.0  # close, but really quantised
    int8_size = (tmp_path / audio_export.AUDIO_INT8_ONNX).stat().st_size
    assert int8_size < 0.9 * (tmp_path / audio_export.AUDIO_ONNX).stat().st_size
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / audio_export.AUDIO_INT8_ONNX)).graph.node}
    assert "MatMulInteger" in ops and "ConvInteger" not in ops

    sess = ort.InferenceSession(str(tmp_path / audio_export.AUDIO_ONNX), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["waveform"]
    assert sess.get_inputs()[0].shape[1] == SEG  # segment length fixed, batch dynamic
    waves = audio_export.parity_waveforms(5, SEG, SR, seed=7)
    emb, raw = sess.run(None, {"waveform": waves})
    assert emb.shape == raw.shape == (5, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    with torch.no_grad():
        ref = audio_student(ConvMel()(torch.from_numpy(waves))).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-4)


def test_audio_parity_failure_stops_the_export(tmp_path: Path, audio_student, monkeypatch):
    real_export = onnx_utils.export_module

    def export_then_drift(module, *a, **kw):
        path = real_export(module, *a, **kw)
        with torch.no_grad():  # the PyTorch side changes after export: parity must catch it
            module.student.projection.embed1.weight.mul_(-1.0)
        return path

    student = build_audio_student({"backbone": "mn04_as", "dropout": 0.1}).eval()
    monkeypatch.setattr(onnx_utils, "export_module", export_then_drift)
    with pytest.raises(onnx_utils.ParityError, match=audio_export.AUDIO_ONNX):
        audio_export.export_audio(student, ConvMel(), tmp_path, segment_samples=SEG, sample_rate=SR,
                                  opset=17, min_cosine=0.9999, quantize=False)


def test_text_export_dynamic_batch_and_length(tmp_path: Path, text_parts):
    model, tok_path = text_parts
    info = stage.export_text(model, tok_path, tmp_path, opset=17, min_cosine=0.9999)
    assert info[stage.TEXT_ONNX]["min_cosine"] > 0.9999 and info["max_length"] == 12
    assert (tmp_path / stage.TOKENIZER).read_bytes() == tok_path.read_bytes()
    from student_clap.tokenizer import encode, load_tokenizer

    ids, mask = encode(load_tokenizer(tmp_path / stage.TOKENIZER), ["calm piano music", "drums"], 12)
    sess = ort.InferenceSession(str(tmp_path / stage.TEXT_ONNX), providers=["CPUExecutionProvider"])
    (emb,) = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)


def test_checksums_match_files(tmp_path: Path):
    (tmp_path / "a.onnx").write_bytes(b"abc")
    (tmp_path / "licenses").mkdir()
    (tmp_path / "licenses" / "X.md").write_text("x")
    path = stage.write_checksums(tmp_path)
    lines = path.read_text().splitlines()
    assert lines == [
        f"{hashlib.sha256(b'abc').hexdigest()}  a.onnx",
        f"{hashlib.sha256(b'x').hexdigest()}  licenses/X.md",
    ]


LICENCES = {
    "training": {"by_license": {"CC0-1.0": {"tracks": 7, "minutes": 4.5}},
                 "by_source": {"fma": {"tracks": 7, "minutes": 4.5}}},
    "audit": {"ok": True, "tracks": 9, "minutes": 6.0, "violations": [],
              "sources": {"fma": {"tracks": 9, "minutes": 6.0, "licenses": {"CC0-1.0": {"tracks": 9, "minutes": 6.0}}}}},
}

METRICS = {
    "audio": {
        "n_val_tracks": 4, "n_val_segments": 20, "n_train_tracks": 12, "skipped": False,
        **{level: {**{k: {"mean": v, "p10": v - 0.1, "p50": v, "p90": v + 0.05}
                      for k, v in (("cosine", 0.91), ("centred", 0.42))},
                   "baseline_cosine": 0.88, "baseline_centred": 0.0}
           for level in ("segment", "track")},
    },
    "text": {"skipped": True, "reason": "distillation.text_enabled: false"},
    "retrieval": {"n_queries": 8, "n_tracks": 4, "k": 4, "note": "only 4 validation tracks: k clipped to 4",
                  "audio_student": {"top_k_overlap": 1.0, "spearman": 0.6, "recall_at_k": 1.0},
                  "centred": {"audio_student": {"top_k_overlap": 0.5, "spearman": 0.2, "recall_at_k": 0.25}}},
    "tags": {"skipped": True, "reason": "the manifest has no tags on validation tracks"},
    "licences": {"audit_ok": True, "tracks": 9, "minutes": 6.0, "violations": 0},
    "notes": ["text student skipped: distillation.text_enabled: false"],
}


def test_model_card_carries_the_figures():
    spec = {"audio": {"sample_rate": 32000, "segment_seconds": 10.0, "hop_seconds": 5.0, "segment_samples": 320000,
                      "mel_shape": [128, 1000]},
            "skipped": {"text": "distillation.text_enabled: false"},
            "parity": {audio_export.AUDIO_ONNX: {"min_cosine": 0.9999991, "max_abs_diff": 2e-6, "rows": 3},
                       audio_export.AUDIO_INT8_ONNX: {"cosine_min": 0.981, "cosine_mean": 0.99}}}
    card = model_card.render(spec=spec, metrics=METRICS, students={"audio": {"config": {"backbone": "mn04_as"}}},
                             licences=LICENCES, licence_files=["licenses/FMA_SONGS_LICENSE.md"], params={"export": {"opset": 17}},
                             file_sizes={audio_export.AUDIO_ONNX: 2_500_000, audio_export.AUDIO_INT8_ONNX: 900_000})
    assert "**The text student is not included:** distillation.text_enabled: false" in card
    assert "| track centred cosine | 0.4200 | 0.3200 | 0.4200 | 0.4700 | 0.0000 |" in card
    assert "32000 Hz" in card and "320000 samples" in card
    assert "| audio student (teacher text) | 1.0000 | 0.6000 | 1.0000 |" in card
    assert "| audio student (teacher text), centred | 0.5000 | 0.2000 | 0.2500 |" in card
    assert "[licenses/FMA_SONGS_LICENSE.md](licenses/FMA_SONGS_LICENSE.md)" in card
    assert "| CC0-1.0 | 7 | 4.5 |" in card and "**passed** (9 tracks, 6.0 minutes)" in card
    assert "| fma | CC0-1.0 | 9 | 6.0 |" in card
    assert "0.981000 min" in card and "2.50 MB" in card
    assert "backbone=mn04_as" in card and "opset=17" in card
    assert "## Intended use and limits" in card
    assert "LAION-CLAP music model (`music_audioset_epoch_15_esc_90.14.pt`" in card
    demo = model_card.render(spec=spec, metrics={**METRICS, "teacher": {"kind": "demo"}}, students={},
                             licences={}, licence_files=[], params={}, file_sizes={})
    assert "offline demo teacher" in demo and "No licence audit was recorded." in demo


@pytest.mark.slow
def test_export_stage_with_the_real_front_end(tmp_path: Path, monkeypatch, audio_student, text_parts):
    pytest.importorskip("pipeline.data.frontends", reason="pipeline.data.frontends (StudentMel) not available")
    from pipeline.models.audio_student import save_audio_student
    from pipeline.models.text_student import save_text_student

    monkeypatch.chdir(tmp_path)
    save_audio_student("models/audio/student.pt", audio_student)
    model, tok_path = text_parts
    save_text_student(model, "models/text/student.pt")
    Path("models/text/tokenizer.json").write_bytes(tok_path.read_bytes())
    Path("models/report").mkdir(parents=True)
    Path("models/report/metrics.json").write_text(json.dumps(METRICS))
    Path("models/report/licences.json").write_text(json.dumps(LICENCES))
    Path("data/licenses").mkdir(parents=True)
    Path("data/licenses/FMA_SONGS_LICENSE.md").write_text("# FMA songs\n")
    params = repo_params({"export": {"quantize_int8": False}})
    assert stage.run(params, None) == 0
    out = Path("models/export")
    spec = json.loads((out / stage.SPEC).read_text())
    assert spec["audio"]["segment_samples"] == 320000 and spec["audio"]["mel_shape"][0] == 128
    assert spec["text"]["max_length"] == 12
    song = spec["audio"]["song"]  # the song-level files, parity-checked, with their fidelity figures
    assert (song["window_columns"], song["hop_columns"]) == (250, 125) and song["head_int8_file"] is None
    assert {song_export.AUDIO_FRONTEND_ONNX, song_export.AUDIO_TRUNK_ONNX, song_export.AUDIO_HEAD_ONNX} <= set(spec["parity"])
    assert song["fidelity"]["synthetic_song_cosine_fp32"] >= 0.999
    assert {audio_export.AUDIO_ONNX, audio_export.AUDIO_MEL_ONNX, stage.TEXT_ONNX, stage.TOKENIZER,
            "README.md", stage.CHECKSUMS} <= {
        p.name for p in out.iterdir()
    }
    assert "licenses/FMA_SONGS_LICENSE.md" in (out / stage.CHECKSUMS).read_text()
    card = (out / "README.md").read_text()
    assert "| fma | CC0-1.0 | 9 | 6.0 |" in card and "track centred cosine" in card
