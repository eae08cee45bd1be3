"""The fetch_weights stage: EfficientAT weights into the DVC-tracked folder, when used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.models.weights import RELEASE_ASSETS, WeightsError
from pipeline.stages.fetch_weights import fetch_stage


def test_no_pretrained_weights_fetches_nothing(tmp_path: Path) -> None:
    fetch_stage("mn04_as", "", tmp_path / "pretrained")
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == ["fetch.json"]
    assert json.loads((tmp_path / "pretrained" / "fetch.json").read_text()) == {"model": "mn04_as", "pretrained": None}


def test_hand_placed_file_is_recorded_with_its_sha256(tmp_path: Path) -> None:
    out = tmp_path / "pretrained"
    out.mkdir()
    (out / "my_mn10.pt").write_bytes(b"weights placed by hand")
    fetch_stage("mn10_as", str(out / "my_mn10.pt"), out)
    record = json.loads((out / "fetch.json").read_text())
    assert record["sha256"] == hashlib.sha256(b"weights placed by hand").hexdigest() and record["size"] == 22


def test_release_file_already_present_is_checked_against_its_recorded_sha256(tmp_path: Path) -> None:
    out = tmp_path / "pretrained"
    out.mkdir()
    asset = out / RELEASE_ASSETS["mn04_as"]
    asset.write_bytes(b"released weights")
    asset.with_name(asset.name + ".sha256").write_text(f"{hashlib.sha256(b'released weights').hexdigest()}  x\n")
    fetch_stage("mn04_as", str(asset), out)  # present and matching: no download
    assert json.loads((out / "fetch.json").read_text())["pretrained"] == str(asset)


def test_missing_or_misplaced_files_are_named(tmp_path: Path) -> None:
    out = tmp_path / "pretrained"
    with pytest.raises(WeightsError, match=r"distill_audio\.pretrained: .*other\.pt not found"):
        fetch_stage("mn10_as", str(out / "other.pt"), out)
    with pytest.raises(WeightsError, match="must sit in"):
        fetch_stage("mn10_as", str(tmp_path / "elsewhere" / "x.pt"), out)
