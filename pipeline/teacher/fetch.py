"""Get the real teacher's inputs (the LAION-CLAP checkpoint, the roberta-base tokenizer) for `student-clap
teacher fetch` and the fetch_teacher stage, verified by sha256. Steps and trust: docs/real-teacher.md, docs/trust.md."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.atomic import atomic_path, write_json
from pipeline.params import DownloadParams, TeacherModelParams
from student_clap.files import sha256_file

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "config.json")
RECORD_NAME = "fetch.json"
DEFAULT_ENDPOINT = "https://huggingface.co"


class FetchError(RuntimeError):
    """One or more teacher files could not be fetched or verified; the message names each."""


@dataclass(frozen=True)
class PlannedFile:
    dest: Path
    sha256: str  # pinned digest, "" when params pin none
    pin_param: str  # the param that pins it, for messages
    repo_id: str = ""  # Hub location (when url is empty)
    filename: str = ""
    revision: str = ""
    url: str = ""  # a non-Hub URL

    @property
    def source(self) -> str:
        """Where the file comes from, as recorded and shown to the user."""
        return self.url or f"hf://{self.repo_id}@{self.revision}/{self.filename}"

    def download_url(self) -> str:
        """A plain URL for copying the file by hand."""
        if self.url:
            return self.url
        endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        return f"{endpoint}/{self.repo_id}/resolve/{self.revision}/{self.filename}"


def planned_files(p: TeacherModelParams) -> list[PlannedFile]:
    """Every file the real teacher needs, with its source and pinned sha256."""
    ckpt = p.checkpoint_hub
    files = [PlannedFile(Path(p.checkpoint), p.checkpoint_sha256.lower(), "teacher.model.checkpoint_sha256",
                         ckpt.repo_id, ckpt.filename, ckpt.revision, p.checkpoint_url)]
    tok = p.tokenizer_hub
    for name in TOKENIZER_FILES:
        url = f"{p.tokenizer_url.rstrip('/')}/{name}" if p.tokenizer_url else ""
        files.append(PlannedFile(Path(p.tokenizer_dir) / name, p.tokenizer_sha256.get(name, "").lower(),
                                 f"teacher.model.tokenizer_sha256.{name}", tok.repo_id, name, tok.revision, url))
    for f in files:
        if not f.url and not (f.repo_id and f.filename and f.revision):
            raise FetchError(f"{f.dest}: no source: set the Hub repo_id and revision (or a URL) in teacher.model")
    return files


def record_path(p: TeacherModelParams) -> Path:
    return Path(p.checkpoint).parent / RECORD_NAME


def manual_instructions(p: TeacherModelParams) -> str:
    lines = ["Place these files by hand (e.g. copied from a machine with network access):"]
    lines += [f"  {f.dest}  <-  {f.download_url()}" for f in planned_files(p)]
    lines.append("then run `dvc repro` (teacher.model.source must be 'checkpoint').")
    return "\n".join(lines)


def _from_hub(f: PlannedFile) -> Path:
    """The file in the Hugging Face cache (downloaded there when missing). Raises FetchError."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # read at call time: huggingface_hub reads it once at import, which may predate the caller's setting
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        cached = hf_hub_download(
            f.repo_id, f.filename, revision=f.revision,
            endpoint=os.environ.get("HF_ENDPOINT") or None,  # honoured even if set after import
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as exc:
        if offline:
            raise FetchError(f"{f.source} -> {f.dest}: HF_HUB_OFFLINE is set and the file is not in the "
                             "Hugging Face cache") from exc
        raise FetchError(f"{f.source} -> {f.dest}: the Hub cannot be reached ({exc})") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise FetchError(f"{f.source} -> {f.dest}: {type(exc).__name__}: {exc}") from exc
    return Path(cached)


def _from_url(f: PlannedFile, d: DownloadParams, progress: bool) -> Path:
    from pipeline.data.download import DownloadError, download

    try:
        download(f.url, f.dest, f.sha256 or None, retries=d.retries, backoff=d.backoff_seconds,
                 timeout=d.timeout_seconds, progress=progress)
    except DownloadError as exc:
        raise FetchError(str(exc)) from exc
    return f.dest


def _judge(f: PlannedFile, path: Path, trust: bool, digest: str | None = None) -> dict:
    """Check `path` against the pin; returns its record entry or raises FetchError."""
    digest = digest or sha256_file(path)
    verified = bool(f.sha256) and digest == f.sha256
    if not verified:
        problem = (f"sha256 {digest} differs from the pinned {f.sha256} ({f.pin_param})" if f.sha256
                   else f"sha256 {digest} is not pinned ({f.pin_param} is empty)")
        if not trust:
            raise FetchError(f"{f.dest} from {f.source}: {problem}; refused. Pin the digest you expect, or pass "
                             "--trust (teacher.model.trust_unverified: true) to accept it unverified")
        log.warning("%s: %s; kept because it is trusted explicitly (recorded in %s)", f.dest, problem, RECORD_NAME)
    return {"path": str(f.dest), "source": f.source, "fetched": True, "sha256": digest, "size": path.stat().st_size,
            "pinned_sha256": f.sha256 or None, "verified": verified, "trusted": not verified}


PLACED = "already in place (not fetched by this project)"


def _in_place(f: PlannedFile, trust: bool, digest: str, before: dict | None) -> dict:
    """The record of a file found in place: its source is where an earlier fetch got these very
    bytes (same sha256 in the previous fetch.json), else it was placed by hand and says so."""
    entry = _judge(f, f.dest, trust, digest)
    if not (before and before.get("sha256") == digest and before.get("source") and before.get("fetched", True)):
        entry.update(source=PLACED, fetched=False)
    return entry


def fetch_file(f: PlannedFile, d: DownloadParams, *, trust: bool = False, progress: bool = True,
               before: dict | None = None) -> dict:
    """Make `f.dest` hold the verified (or explicitly trusted) file; returns its record entry.

    `before`: this file's entry in the previous fetch.json, if any (see `_in_place`)."""
    if f.dest.is_file():
        digest = sha256_file(f.dest)
        if digest == f.sha256 or (not f.sha256 and trust):
            log.info("%s already present and verified" if f.sha256 else "%s already present (unpinned, trusted)",
                     f.dest)
            return _in_place(f, trust, digest, before)
        if f.sha256:  # pinned and different: never leave the wrong bytes where the teacher looks
            log.warning("%s has sha256 %s, not the pinned %s (%s); removed, fetching it again",
                        f.dest, digest, f.sha256, f.pin_param)
            f.dest.unlink()
    if not f.sha256 and not trust:
        # refuse before transferring bytes nobody can verify (the checkpoint is 2.3 GB)
        raise FetchError(f"{f.dest} from {f.source}: no sha256 pinned ({f.pin_param} is empty); refused. Pin it, "
                         "or pass --trust (teacher.model.trust_unverified: true) to accept the file unverified")
    if f.url:
        # pinned: the downloader checks the digest and removes a bad file; trusted: fetch without the
        # pin, then judge (and record) what arrived
        _from_url(f if f.sha256 and not trust else PlannedFile(f.dest, "", f.pin_param, url=f.url), d, progress)
        return _judge(f, f.dest, trust)
    log.info("fetching %s -> %s", f.source, f.dest)
    cached = _from_hub(f)
    entry = _judge(f, cached, trust)  # before placing: a refused file never reaches dest
    with atomic_path(f.dest) as tmp:  # a reader never sees half a file
        shutil.copyfile(cached, tmp)
    entry["path"] = str(f.dest)
    return entry


def write_record(path: Path, entries: list[dict], source: str) -> None:
    """fetch.json: what was fetched from where, its sha256, and whether it was verified or trusted."""
    body = {"teacher_source": source, "files": entries,
            "trusted_unverified": [e["path"] for e in entries if e["trusted"]]}
    write_json(path, body, sort_keys=True)


def fetch(p: TeacherModelParams, d: DownloadParams, *, trust: bool = False,
          progress: bool = True) -> list[dict]:
    """Fetch and verify every file; writes fetch.json and returns its entries.

    Every file is tried; a FetchError listing each failed file is raised at the end."""
    entries, errors = [], []
    try:  # path -> entry of the fetch.json an earlier run wrote (none when it is missing or unreadable)
        files = json.loads(record_path(p).read_text(encoding="utf-8")).get("files") or []
        previous = {str(e["path"]): e for e in files if isinstance(e, dict) and "path" in e}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        previous = {}
    for f in planned_files(p):
        try:
            entries.append(fetch_file(f, d, trust=trust, progress=progress, before=previous.get(str(f.dest))))
        except FetchError as exc:
            errors.append(str(exc))
    if errors:
        raise FetchError(f"{len(errors)} teacher file(s) not fetched:\n  " + "\n  ".join(errors))
    write_record(record_path(p), entries, "checkpoint")
    return entries


def main(args: argparse.Namespace) -> int:
    from pipeline.params import load_params
    from pipeline.teacher.convert import load_roberta_tokenizer
    from pipeline.teacher.model import TeacherError

    params = load_params(args.params)
    p = params.teacher.model
    trust = args.trust or p.trust_unverified
    try:
        entries = fetch(p, params.ingest.downloads, trust=trust)
        load_roberta_tokenizer(p.tokenizer_dir)  # refuses truncated or empty vocabulary files
    except (FetchError, TeacherError) as exc:
        log.error("%s\n%s", exc, manual_instructions(p))
        return 1
    trusted = [e["path"] for e in entries if e["trusted"]]
    if trusted:
        log.warning("trusted without verification: %s (see %s)", ", ".join(trusted), record_path(p))
    log.info(
        "teacher files ready: %s and %s/ (sha256 in %s). Set teacher.model.source: checkpoint and run `dvc repro`.",
        p.checkpoint, p.tokenizer_dir, record_path(p),
    )
    return 0
