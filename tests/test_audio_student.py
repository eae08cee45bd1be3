"""Audio student: shapes, no AudioSet head, pretrained loading, student.pt format, weights fetch."""

from __future__ import annotations

import argparse
import functools
import http.server
import logging
import threading
from pathlib import Path

import pytest
import torch

from pipeline.models import weights
from pipeline.models.audio_student import (
    build_audio_student,
    init_audio_student,
    load_audio_student,
    load_pretrained_encoder,
    save_audio_student,
)
from pipeline.models.efficientat import build_mobilenet, count_parameters

CFG = {"backbone": "mn04_as", "embed_dim": 512, "dropout": 0.1}


def _released_like(name: str, path: Path, seed: int = 1) -> dict:
    """A file shaped like a released checkpoint: full tagger state dict incl. classifier."""
    torch.manual_seed(seed)
    model = build_mobilenet(name)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state = model.state_dict()
    torch.save(state, path)
    return state


def test_forward_shape_and_norm() -> None:
    torch.manual_seed(0)
    s = build_audio_student(CFG).eval()
    mel = torch.randn(3, 128, 200)
    with torch.no_grad():
        out = s(mel)
        raw = s.embed_raw(mel)
    assert out.shape == (3, 512)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out, torch.nn.functional.normalize(raw, dim=-1))
    with pytest.raises(ValueError, match="n_mels"):
        s(torch.randn(1, 1, 128, 10))


def test_no_audioset_head_parameters() -> None:
    s = build_audio_student(CFG)
    assert not any("classifier" in k for k in s.state_dict())
    trunk = count_parameters(build_mobilenet("mn04_as", num_classes=0))
    head = 384 * 512 + 512 * 512 + 512  # embed1, embed2 (no biases), output bias
    assert s.num_parameters() == trunk + head
    assert all(m.momentum == 0.1 for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_output_bias_starts_on_the_teacher_mean() -> None:
    torch.manual_seed(0)
    s = build_audio_student({**CFG, "dropout": 0.0})
    mels = torch.randn(4, 128, 64)
    direction = torch.nn.functional.normalize(torch.randn(512), dim=0)
    length = s.init_output_bias(mels, direction, spread=0.2)
    assert torch.allclose(s.output_bias / length, direction, atol=1e-6)
    s.train()  # batch statistics, as the bias was measured
    with torch.no_grad():
        out = s(mels)
    # outputs now sit around the mean direction, about atan(0.2) away from it
    cos = out @ direction
    assert cos.min() > 0.9 and cos.max() < 0.995


def test_unknown_config_key() -> None:
    with pytest.raises(ValueError, match="backbon"):
        build_audio_student({"backbon": "mn04_as"})


def test_pretrained_loads_features_and_ignores_classifier(tmp_path: Path, caplog) -> None:
    ckpt = tmp_path / "mn04_as_mAP_432.pt"
    state = _released_like("mn04_as", ckpt)
    s = build_audio_student(CFG)
    with caplog.at_level(logging.INFO):
        info = load_pretrained_encoder(s, ckpt)
    assert info["pretrained"] and info["ignored_keys"] == 4
    assert "classifier" in caplog.text
    own = s.encoder.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_pretrained_wrong_width_is_an_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "mn10.pt"
    _released_like("mn10_as", ckpt)
    with pytest.raises(ValueError, match="mn04_as"):
        load_pretrained_encoder(build_audio_student(CFG), ckpt)


def test_random_init_when_weights_absent(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        _, pretrained = init_audio_student(CFG, tmp_path / "missing.pt")
    assert pretrained is False
    assert "random init" in caplog.text


def test_student_file_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = build_audio_student(CFG).eval()
    path = tmp_path / "student.pt"
    save_audio_student(path, s, {"pretrained": False, "val_track_cosine": 0.5})
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"state_dict", "config", "metrics"}
    assert payload["metrics"]["pretrained"] is False
    again = load_audio_student(path)
    mel = torch.randn(2, 128, 100)
    with torch.no_grad():
        assert torch.allclose(s(mel), again(mel))


def test_skipped_student_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "student.pt"
    torch.save({"skipped": True}, path)
    with pytest.raises(ValueError, match="skipped"):
        load_audio_student(path)


def test_stage2_freezes_encoder_and_its_batchnorm() -> None:
    s = build_audio_student(CFG)
    s.freeze_encoder()
    s.train()
    assert not s.encoder.training and s.projection.training
    assert all(not p.requires_grad for p in s.encoder.parameters())
    assert all(p.requires_grad for p in s.head_parameters())
    assert any(p is s.output_bias for p in s.head_parameters())


# ---------------------------------------------------------------- weights fetch


@pytest.fixture()
def http_root(tmp_path: Path):
    root = tmp_path / "srv"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_fetch_from_url_records_and_enforces_sha(http_root, tmp_path: Path) -> None:
    root, base = http_root
    _released_like("mn04_as", root / "mn04_as_mAP_432.pt")
    out = tmp_path / "pretrained"
    args = argparse.Namespace(name="mn04_as", out=str(out), source=base)
    assert weights.main(args) == 0
    dest = out / "mn04_as_mAP_432.pt"
    recorded = (out / "mn04_as_mAP_432.pt.sha256").read_text().split()[0]
    assert recorded == weights.sha256_file(dest) == weights.sha256_file(root / "mn04_as_mAP_432.pt")
    load_pretrained_encoder(build_audio_student(CFG), dest)  # the fetched file is usable

    # a file that no longer matches its recorded digest is fetched again, and a server that now
    # serves different bytes fails the check
    dest.write_bytes(b"truncated")
    _released_like("mn04_as", root / "mn04_as_mAP_432.pt", seed=2)
    assert weights.main(args) == 1


def test_fetch_from_local_file(tmp_path: Path) -> None:
    src = tmp_path / "downloaded.pt"
    _released_like("mn04_as", src)
    path = weights.fetch_weights("mn04_as", tmp_path / "out", source=str(src))
    assert path.name == "mn04_as_mAP_432.pt" and path.read_bytes() == src.read_bytes()
    with pytest.raises(weights.WeightsError, match="nope"):
        weights.fetch_weights("mn10_as", tmp_path / "out", source=str(tmp_path / "nope.pt"))
    with pytest.raises(weights.WeightsError, match="mn99"):
        weights.asset_name("mn99_as")


def test_output_bias_init_leaves_running_statistics_alone() -> None:
    torch.manual_seed(0)
    s = build_audio_student(CFG)
    before = {k: v.clone() for k, v in s.state_dict().items() if "running" in k}
    length = s.init_output_bias(torch.randn(4, 128, 64), torch.ones(512), spread=0.2)
    assert length > 1e-2  # measured with batch statistics, not the untrained running ones
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items() if "running" in k)


def test_batchnorm_recalibration_matches_population_statistics() -> None:
    torch.manual_seed(0)
    s = build_audio_student(CFG)
    data = [torch.randn(12, 128, 32) * 0.5 + 0.2 for _ in range(2)]
    population = torch.cat(data)

    def agreement() -> float:
        """Mean cosine of eval-mode outputs with batch-statistics outputs on the population."""
        s.eval()
        with torch.no_grad():
            eval_out = s(population)
        s.train()
        s.projection.eval()
        moms = [(m, m.momentum) for m in s.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m, _ in moms:
            m.momentum = 0.0
        with torch.no_grad():
            batch_out = s(population)
        for m, mom in moms:
            m.momentum = mom
        s.train()
        return float(torch.nn.functional.cosine_similarity(eval_out, batch_out).mean())

    fresh = agreement()
    assert s.recalibrate_batchnorm(iter(data)) == 24
    bn = s.encoder.features[0][1]
    with torch.no_grad():
        stem = s.encoder.features[0][0](population.unsqueeze(1))
    assert torch.allclose(bn.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1 and s.training
    recalibrated = agreement()
    # up to unbiased-vs-biased variance and per-batch means in the deeper layers
    assert recalibrated > 0.95 and recalibrated > fresh + 0.3
