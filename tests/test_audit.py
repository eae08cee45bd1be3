"""`student-clap licenses audit` against small HDF5 caches with a planted unlicensed track."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.data.audit import AuditError, main, run_audit
from pipeline.data.manifest import write_manifest
from repo_params import PARAMS_YAML, section


def _row(tid: str, source: str, lic: str, duration: float | None) -> dict:
    return {
        "track_id": tid, "source": source, "artist": "A " + tid, "title": "T", "audio_path": f"a/{tid}.mp3",
        "license": lic, "license_url": None, "url": None, "split": "train", "tags": [], "duration": duration,
    }


ROWS = [
    _row("fma:a/b/c", "fma", "CC-BY-4.0", 120.0),
    _row("jamendo:1", "jamendo", "CC-BY-3.0", None),  # duration from the mel cache
    _row("jamendo:2", "jamendo", "CC-BY-SA-3.0", 60.0),  # allowed only with allow_by_sa
    _row("wikimedia:x.ogg", "wikimedia", "public-domain", 30.0),
]


def _cache(path: Path, ids: list[str], durations: list[float] | None = None) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("tracks/track_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        if durations is not None:
            f.create_dataset("tracks/duration", data=np.array(durations, dtype=np.float32))
    return path


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    write_manifest(tmp_path / "manifest.jsonl", ROWS)
    return {
        "manifest": tmp_path / "manifest.jsonl",
        "mels": _cache(tmp_path / "mels.h5", ["fma:a/b/c", "jamendo:1", "wikimedia:x.ogg"], [120.0, 90.0, 30.0]),
        "teacher": _cache(tmp_path / "teacher.h5", ["fma:a/b/c", "jamendo:1", "wikimedia:x.ogg"]),
    }


def test_clean_caches_pass_with_table(files) -> None:
    rep = run_audit(files["manifest"], files["mels"], files["teacher"], section("ingest.policy"))
    assert rep.ok and rep.tracks == 3
    assert rep.table[("jamendo", "CC-BY-3.0")] == {"tracks": 1, "minutes": 1.5}  # 90 s from mels.h5
    assert rep.minutes == pytest.approx((120 + 90 + 30) / 60)
    d = rep.to_dict()
    assert d["sources"]["fma"]["licenses"]["CC-BY-4.0"]["tracks"] == 1 and d["ok"] is True


def test_planted_unlicensed_track_fails(files, tmp_path: Path, capsys) -> None:
    teacher = _cache(tmp_path / "teacher_bad.h5", ["fma:a/b/c", "fma:planted/no/licence", "jamendo:2"])
    rep = run_audit(files["manifest"], files["mels"], teacher, section("ingest.policy"))
    problems = {(v.track_id, v.problem.split(":")[0]) for v in rep.violations}
    assert problems == {("fma:planted/no/licence", "not in the manifest"), ("jamendo:2", "licence not allowed")}
    assert not rep.ok
    # the same cache passes the BY-SA track once the policy allows BY-SA (still fails on the planted one)
    rep2 = run_audit(files["manifest"], None, teacher, section("ingest.policy", allow_by_sa=True))
    assert [v.track_id for v in rep2.violations] == ["fma:planted/no/licence"]
    # the policy as ingest records it in audit.json (a plain dict) works the same way
    recorded = {**dataclasses.asdict(section("ingest.policy")), "allow_by_sa": True}
    rep3 = run_audit(files["manifest"], None, teacher, recorded)
    assert [v.track_id for v in rep3.violations] == ["fma:planted/no/licence"]
    with pytest.raises(AuditError, match="allow_everything"):
        run_audit(files["manifest"], None, teacher, {**recorded, "allow_everything": True})
    with pytest.raises(AuditError, match=r"missing key\(s\) licence policy\.allow_nd"):
        run_audit(files["manifest"], None, teacher, {k: v for k, v in recorded.items() if k != "allow_nd"})

    out = tmp_path / "audit.json"
    args = argparse.Namespace(manifest=str(files["manifest"]), mels=str(files["mels"]), teacher=str(teacher),
                              json_out=str(out), params=str(PARAMS_YAML))
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "VIOLATION fma:planted/no/licence" in printed and "FAILED: 2 violation(s)" in printed
    assert json.loads(out.read_text())["ok"] is False


def test_violation_names_why_ingest_left_the_track_out(files, tmp_path: Path) -> None:
    (tmp_path / "licenses").mkdir()
    entries = [{"track_id": "fma:nc", "status": "excluded", "reason": "licence not allowed",
                "detail": "licence not allowed: CC-BY-NC-4.0 (allow_nc is false)"}]
    (tmp_path / "licenses" / "audit.json").write_text(json.dumps({"entries": entries}))
    rep = run_audit(files["manifest"], _cache(tmp_path / "m.h5", ["fma:nc"]), None, section("ingest.policy"))
    assert rep.violations[0].problem == "not in the manifest (ingest excluded it: licence not allowed: CC-BY-NC-4.0 (allow_nc is false))"


def test_main_passes_and_prints_minutes(files, capsys, tmp_path: Path) -> None:
    args = argparse.Namespace(manifest=str(files["manifest"]), mels=str(files["mels"]), teacher=str(files["teacher"]),
                              json_out=None, params=str(PARAMS_YAML))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "public-domain" in out and "OK: all 3 cached tracks" in out


def test_unreadable_cache_is_a_clear_error(files, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(AuditError, match="bad.h5"):
        run_audit(files["manifest"], bad, None, section("ingest.policy"))
    with h5py.File(tmp_path / "noids.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(AuditError, match="no track id dataset"):
        run_audit(files["manifest"], tmp_path / "noids.h5", None, section("ingest.policy"))
    with pytest.raises(AuditError, match="manifest not found"):
        run_audit(tmp_path / "none.jsonl", files["mels"], None, section("ingest.policy"))
