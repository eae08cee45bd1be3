"""`weights fetch` without a pinned sha256 keeps only a loadable state dict of the right model."""

from __future__ import annotations

import argparse
import functools
import http.server
import threading
from pathlib import Path

import pytest
import torch

from pipeline.models import weights
from pipeline.models.efficientat import build_mobilenet


@pytest.fixture()
def http_root(tmp_path: Path):
    root = tmp_path / "srv"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_junk_from_a_url_is_refused_and_not_stored(http_root, tmp_path: Path, caplog) -> None:
    root, base = http_root
    (root / "mn04_as_mAP_432.pt").write_bytes(bytes(range(256)) * 94)  # 24 064 bytes of junk
    out = tmp_path / "pretrained"
    assert weights.main(argparse.Namespace(name="mn04_as", out=str(out), source=base)) == 1
    assert "mn04_as_mAP_432.pt: not a loadable state dict" in caplog.text
    assert not (out / "mn04_as_mAP_432.pt").exists() and not (out / "mn04_as_mAP_432.pt.sha256").exists()


def test_another_models_weights_are_refused(http_root, tmp_path: Path) -> None:
    root, base = http_root
    torch.save(build_mobilenet("mn01_as").state_dict(), root / "mn04_as_mAP_432.pt")  # the wrong width
    with pytest.raises(weights.WeightsError, match="not an EfficientAT mn04_as checkpoint"):
        weights.fetch_weights("mn04_as", tmp_path / "out", source=base, progress=False)
    assert not (tmp_path / "out" / "mn04_as_mAP_432.pt").exists()


def test_pickled_objects_in_a_local_file_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "x.pt"
    torch.save({"features.0.weight": torch.zeros(1), "args": argparse.Namespace(a=1)}, src)
    with pytest.raises(weights.WeightsError, match="not a loadable state dict"):
        weights.fetch_weights("mn04_as", tmp_path / "out", source=str(src))
    assert not list((tmp_path / "out").iterdir())
