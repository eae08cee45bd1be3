"""The model identity: one string naming everything that decides what a vector means.

    student-clap-model/1 teacher=demo:053134b89e71b4bb audio=3f2a9c0d11e2b7a4 text=ab12cd34ef567890
    frontend=logmel128@32000Hz/decode48000Hz segment=10s hop=5s pooling=mean-l2 precision=fp32

- teacher: the teacher's kind (`demo`, `demo_random` or `checkpoint`) and the first 16 hex digits
  of its sha256 (the LAION checkpoint's, or the demo teacher's weights');
- audio / text: sha256 (16 hex digits) over the sha256s of the student's files (the song path's
  front-end, trunk and head; the text model and its tokenizer), each ONNX file hashed as
  serialised without the identity's own metadata_props entries (a string cannot name its own hash);
- frontend, segment, hop, pooling, precision: how a song becomes a vector.

The export writes it into student_clap.json (`model_identity`), every ONNX file's metadata_props
(`student_clap.model_identity`) and the model card; the library index stores it, and every command
refuses an index of another identity (`index` embeds every song again instead). An export without
one (written before identities existed) is named by a digest of its files (`unstamped ...`).
Integrity of the files themselves is SHA256SUMS's job, not this string's.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from student_clap.files import sha256_file
from student_clap.spec import SPEC_FILE, SearchError, audio_identity, load_spec, song_files, text_identity

if TYPE_CHECKING:
    from student_clap.index import Index

log = logging.getLogger(__name__)

VERSION = "student-clap-model/1"
METADATA_KEY = "student_clap.model_identity"
TEACHER_METADATA_KEY = "student_clap.teacher"
SHORT = 16  # hex digits of each sha256 in the string: an identity, not an integrity check
DEMO_KINDS = ("demo", "demo_random")
DEMO_NOTE = ("note: these students were distilled from the offline demo teacher (teacher.model.source {kind}), "
             "not LAION-CLAP: they know only synthetic test songs, so results show the software works, "
             "not what real music sounds like")


def _files_digest(models_dir: Path, names: list[str], file_hash: Callable[[Path], str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}={file_hash(models_dir / name)}\n".encode())
    return digest.hexdigest()[:SHORT]


def _num(x: Any) -> str:
    return f"{float(x):g}"


def teacher_record(teacher: Mapping[str, Any]) -> dict[str, Any]:
    """What student_clap.json says of the teacher, from evaluate's `teacher` section
    (pipeline.evaluation.report.teacher_identity): kind, sha256, source, and whether it is a demo one."""
    kind = str(teacher.get("kind") or "unknown")
    sha = str(teacher.get("checkpoint_sha256") or teacher.get("weights_sha256") or teacher.get("sha256") or "")
    record = {"kind": kind, "sha256": sha, "source": str(teacher.get("source") or ""), "demo": kind in DEMO_KINDS}
    if record["demo"]:
        record["note"] = DEMO_NOTE.format(kind=kind)
    return record


def compose(models_dir: str | Path, spec: Mapping[str, Any], teacher: Mapping[str, Any],
            file_hash: Callable[[Path], str] = sha256_file) -> str:
    """The identity string of the export in `models_dir` described by `spec` (student_clap.json's
    content) and distilled from `teacher` (a teacher_record). `file_hash`: the export passes one
    that leaves out the identity's own metadata, so restamping a file does not change its hash."""
    models_dir = Path(models_dir)
    parts = [VERSION, f"teacher={teacher.get('kind') or 'unknown'}:{(teacher.get('sha256') or 'none')[:SHORT]}"]
    audio = spec.get("audio") or {}
    names = [n for n in song_files(audio) if n]
    parts.append(f"audio={_files_digest(models_dir, names, file_hash) if names else 'none'}")
    text = spec.get("text") or {}
    tnames = [n for n in (text.get("file"), text.get("tokenizer")) if n]
    parts.append(f"text={_files_digest(models_dir, tnames, file_hash) if tnames else 'none'}")
    if audio:
        fe = (audio.get("song") or {}).get("frontend") or {}
        bins = (audio.get("mel_shape") or ["?"])[0]
        kind = "logmel" if fe else "onnx-frontend"
        parts += [f"frontend={kind}{bins}@{audio['sample_rate']}Hz/decode{audio.get('decode_sample_rate') or audio['sample_rate']}Hz",
                  f"segment={_num(audio['segment_seconds'])}s", f"hop={_num(audio['hop_seconds'])}s",
                  "pooling=mean-l2"]  # l2_normalize(mean(embedding_raw over the windows))
    parts.append("precision=fp32")  # the runtime reads the fp32 files only (docs/runtime.md)
    return " ".join(parts)


def model_identity(models_dir: str | Path) -> str:
    """The identity of the export in `models_dir`: the one it was written with, or for an export
    without one a digest of its files."""
    spec = load_spec(models_dir)
    stamped = spec.get("model_identity")
    if stamped:
        if not isinstance(stamped, str):
            raise SearchError(f"{Path(models_dir) / 'student_clap.json'}: model_identity must be a string")
        return stamped
    return f"unstamped audio={audio_identity(models_dir)[:SHORT] or 'none'} text={text_identity(models_dir)[:SHORT] or 'none'}"


def teacher_note(models_dir: str | Path) -> str:
    """The sentence to print once when the export's teacher was a demo one ("" otherwise)."""
    teacher = load_spec(models_dir).get("teacher") or {}
    if teacher.get("demo") or teacher.get("kind") in DEMO_KINDS:
        return teacher.get("note") or DEMO_NOTE.format(kind=teacher.get("kind"))
    return ""


def onnx_identity(session: Any) -> str:
    """The identity an onnxruntime session's model carries in its metadata ("" when none)."""
    try:
        return session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "")
    except Exception:  # a session without readable metadata says nothing
        return ""


def mismatch_message(where: str, stored: str, current: str, models_dir: str | Path, rebuild: str) -> str:
    return (f"{where} was built with model\n  {stored or '(none recorded)'}\nbut {models_dir} holds\n  {current}\n"
            f"its vectors mean nothing next to this model's; {rebuild}")


def checked_identity(models_dir: Path, session: Any) -> str:
    """The export's model identity, refused when the ONNX file's metadata names another one (a
    student_clap.json copied next to other files)."""
    identity = model_identity(models_dir)
    stamped = onnx_identity(session)
    if stamped and stamped != identity:
        raise SearchError(f"{models_dir}: the ONNX files carry model identity\n  {stamped}\nbut {SPEC_FILE} says\n  "
                          f"{identity}\nthe folder mixes two exports; export or download it again")
    return identity


def check_index_model(index: Index, models_dir: str | Path, force: bool = False, forceable: bool = True) -> None:
    """Refuse (SearchError) an index built by another model than the one in `models_dir` (another
    model identity, or other audio files), or one that cannot be checked, unless `force`; then only warn."""
    identity = model_identity(models_dir)
    current = audio_identity(models_dir)
    if current and index.audio_model == current and index.model_identity == identity:
        return
    if current and index.model_identity != identity:
        problem = mismatch_message(index.source, index.model_identity, identity, models_dir,
                                   f"re-index with `student-clap index DIR --out {index.source} --models {models_dir}`")
    elif current:
        problem = (f"{index.source} was built by another audio model than the one in {models_dir}, so its scores "
                   f"would mean nothing; re-index with `student-clap index DIR --out {index.source} --models {models_dir}`")
    else:
        problem = f"{models_dir} holds no song-level audio model, so the model that built {index.source} cannot be checked"
    if not force:
        raise SearchError(problem + (", or pass --force to search anyway" if forceable else ""))
    log.warning("%s; searching anyway (--force)", problem)
