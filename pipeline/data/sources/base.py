"""What every source adapter produces: entries, and problems that name the file and line."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = ("mp3", "ogg", "opus", "oga", "flac", "wav")


@dataclass
class Entry:
    """One song as a list or metadata file describes it (before policy and audio checks)."""

    source: str  # fma | jamendo | wikimedia
    track_id: str  # "<source>:<stable id>"
    file: str  # the list/metadata file it came from
    line: int  # 1-based line (or record number for JSON)
    artist: str | None = None
    title: str | None = None
    url: str | None = None  # the song's page
    license_text: str | None = None  # as written: URL, markdown link or name
    license_url: str | None = None
    source_path: str | None = None  # FMA link stem, MTG path line, Wikimedia FILENAME
    candidates: list[str] = field(default_factory=list)  # audio paths relative to audio_root, in order
    download_path: str | None = None  # relative path fetched from a mirror laid out like audio_root
    download_url: str | None = None  # exact file URL when the metadata names one
    artist_key: str | None = None  # dataset artist id: groups the split only when no name is known
    tags: list[str] = field(default_factory=list)
    duration: float | None = None
    notes: list[str] = field(default_factory=list)  # non-fatal oddities (bad bytes, missing fields)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Problem:
    """An entry that could not be used at all (no id or no way to find its audio)."""

    source: str
    file: str
    line: int
    detail: str
    text: str = ""  # the offending line(s), shortened


@dataclass
class ParseResult:
    entries: list[Entry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. the mirror URL a list header names

    def extend(self, other: ParseResult) -> None:
        self.entries += other.entries
        self.problems += other.problems
        self.meta.update(other.meta)


@dataclass(frozen=True)
class SourceFiles:
    """The files params name for one source (already checked to exist)."""

    lists: list[Path]
    metadata: list[Path]  # checksum lists removed: ingest reads those itself
    licenses_file: Path | None = None


@dataclass(frozen=True)
class SongSource:
    """Everything ingest needs from one corpus (docs/layout.md, "Adding a song source")."""

    name: str
    attribution_file: str  # data/licenses/<attribution_file>, in the source's list format
    parse: Callable[[SourceFiles], ParseResult]  # lists + native metadata -> entries and problems
    attribution: Callable[[list[dict], str], str]  # included manifest rows, mirror URL -> file text
    download_base: str = ""  # where missing audio is fetched from when params name no mirror


def new_entry(source: str, path: Path, line: int, key: str, **fields: Any) -> Entry:
    """An Entry read at `path`:`line` whose track id is `<source>:<key>`."""
    return Entry(source=source, track_id=f"{source}:{key}", file=str(path), line=line, **fields)


def lists_then_metadata(
    parse_list: Callable[[Path], ParseResult], parse_metadata: Callable[[Path], ParseResult]
) -> Callable[[SourceFiles], ParseResult]:
    """The usual `SongSource.parse`: every song list, then every native metadata file."""

    def parse(files: SourceFiles) -> ParseResult:
        res = ParseResult()
        for path in files.lists:
            res.extend(parse_list(path))
        for path in files.metadata:
            res.extend(parse_metadata(path))
        return res

    return parse


def read_lines(path: Path) -> tuple[list[str], set[int]]:
    """Lines of a text file and the 1-based numbers of lines that were not valid UTF-8.

    Such lines are decoded as cp1252 (the usual origin of stray bytes in these lists) so the
    rest of the entry is still usable; the caller notes them in the audit.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8").splitlines(), set()
    except UnicodeDecodeError:
        pass
    lines, bad = [], set()
    for i, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(raw.decode("cp1252", errors="replace"))
            bad.add(i)
    log.warning("%s: %d line(s) are not valid UTF-8 (read as cp1252): %s", path, len(bad), sorted(bad)[:10])
    return lines, bad


def shorten(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def url_last_segment(url: str) -> str:
    """Last non-empty path segment of a URL, percent-decoded."""
    path = urlsplit(url.strip()).path
    segs = [s for s in path.split("/") if s]
    return unquote(segs[-1]) if segs else ""


def clean(text: str | None) -> str | None:
    """Collapse whitespace; '' and None become None."""
    if text is None:
        return None
    text = " ".join(text.split())
    return text or None


_EXT = re.compile(r"\.(" + "|".join(AUDIO_EXTENSIONS) + r")$", re.I)


def strip_audio_ext(name: str) -> str:
    return _EXT.sub("", name)


def has_audio_ext(name: str) -> bool:
    return bool(_EXT.search(name))


_CHECKSUM_LINE = re.compile(r"^([0-9a-fA-F]{64})\s+\*?(\S.*?)\s*$")


def is_checksum_file(path: Path) -> bool:
    """A `sha256sum`-style list (`<hex> <relative path>` per line), as MTG-Jamendo publishes."""
    with open(path, "rb") as fh:
        first = fh.readline(4096).decode("utf-8", errors="replace").strip()
    return bool(_CHECKSUM_LINE.match(first))


def parse_checksums(path: Path, source: str = "checksums") -> tuple[dict[str, str], list[Problem]]:
    """relative path -> lower-case sha256, and the lines that do not fit the format (as `source`'s problems)."""
    lines, _ = read_lines(path)
    sums, problems = {}, []
    for i, text in enumerate(lines, 1):
        if not text.strip():
            continue
        m = _CHECKSUM_LINE.match(text.strip())
        if m:
            sums[m.group(2)] = m.group(1).lower()
        else:
            problems.append(Problem(source, str(path), i, "not a '<sha256> <path>' line", shorten(text)))
    return sums, problems


def _fully_unquoted(text: str) -> str:
    """Percent-decode until stable, so '%252F' (an encoded '%2F') cannot hide a separator."""
    for _ in range(4):
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    return text


def escapes_root(root: str | Path, rel: str) -> bool:
    """True when the relative audio path `rel` could name a file outside `root` (docs/trust.md, "Paths").

    Absolute paths, drive letters and `..` segments (backslashes read as separators), as written or
    percent-decoded, are refused outright; what remains must lie under `root` once symlinks are followed.
    """
    for text in {rel, _fully_unquoted(rel)}:
        if not text or "\x00" in text:
            return True
        posix = text.replace("\\", "/")
        parts = PurePosixPath(posix).parts
        if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in parts:
            return True
    base = Path(root).resolve()
    return not (Path(root) / rel).resolve().is_relative_to(base)


def escaping_symlink(root: str | Path, rel: str) -> tuple[Path, Path] | None:
    """The first symlink on the way from `root` to `rel` whose target lies outside `root`, and that
    target; None when no symlink leads out."""
    base = Path(root).resolve()
    path = Path(root)
    for part in PurePosixPath(_fully_unquoted(rel).replace("\\", "/")).parts:
        path = path / part
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(base):
                return path, target
    return None


def outside_root_detail(root: str | Path, rel: str) -> str:
    """Why `rel` is refused (see escapes_root), naming the symlink when one leads out of the root."""
    link = escaping_symlink(root, rel)
    if link is not None:
        return f"{rel!r} is a symlink ({link[0]} -> {link[1]}) pointing outside the audio root {root}"
    return f"{rel!r} resolves outside {root}"


def symlinks_leaving(root: str | Path) -> list[tuple[Path, Path]]:
    """Every symlink under `root` (files or folders, not followed) whose target lies outside it."""
    base = Path(root).resolve()
    found = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(base):
                found.append((path, path.resolve()))
    return sorted(found)
