"""Free Music Archive: the `SONG:/LINK:/LICENSE LINK:` list and FMA's metadata CSVs.

Track ids: `fma:<numeric track_id>` where FMA's metadata gives one, otherwise `fma:` plus the
LINK path below `/music/` (`fma:Aaron_Dunn/Bachs_Minuet/Minuet_-_Notebook_for_Anna_Magdalena`).
Audio under the source's audio_root: `<last LINK segment>.<ext>` for list entries, and also
FMA's own layout `<id[:3]>/<id>.mp3` (six-digit zero-padded id) for metadata entries.
"""

from __future__ import annotations

import ast
import csv
import logging
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.data.licenses import canonical_url, one_line
from pipeline.data.sources.base import (
    AUDIO_EXTENSIONS,
    Entry,
    ParseResult,
    Problem,
    SongSource,
    clean,
    has_audio_ext,
    lists_then_metadata,
    new_entry,
    read_lines,
    shorten,
    strip_audio_ext,
    url_last_segment,
)

log = logging.getLogger(__name__)
SOURCE = "fma"
_KEY = re.compile(r"^\s*(SONG|LINK|LICENSE LINK|LICENSE URL|LICENSE)\s*:\s*(.*?)\s*$", re.I)


def _id_from_link(link: str) -> str:
    """The id part of a LINK: its path below `/music/` ('' when there is none)."""
    path = unquote(urlsplit(link.strip()).path)
    if "/music/" in path:
        path = path.split("/music/", 1)[1]
    return path.strip("/")


def _stem_candidates(stem: str) -> list[str]:
    if has_audio_ext(stem):
        return [stem] + [f"{strip_audio_ext(stem)}.{e}" for e in AUDIO_EXTENSIONS]
    return [f"{stem}.{e}" for e in AUDIO_EXTENSIONS]


def _dataset_path(track_id: int) -> str:
    tid = f"{track_id:06d}"
    return f"{tid[:3]}/{tid}.mp3"


def _split_song(song: str) -> tuple[str | None, str | None]:
    """'Artist - Title' -> (artist, title); the first ' - ' separates (titles often hold more)."""
    if " - " in song:
        artist, title = song.split(" - ", 1)
        return clean(artist), clean(title)
    return None, clean(song)


def parse_list(path: Path) -> ParseResult:
    """An FMA_SONGS_LICENSE.md: blocks of SONG / LINK / LICENSE LINK lines."""
    lines, bad = read_lines(path)
    res = ParseResult()
    block: dict[str, tuple[int, str]] = {}
    start = 0

    def flush() -> None:
        if not block:
            return
        song = block.get("SONG", (start, ""))[1]
        link = block.get("LINK", (start, ""))[1]
        lic = block.get("LICENSE LINK") or block.get("LICENSE URL") or block.get("LICENSE")
        raw = " | ".join(f"{k}: {v}" for k, (_, v) in block.items())
        key = _id_from_link(link) if link else ""
        stem = url_last_segment(link) if link else ""
        if not key or not stem:
            res.problems.append(Problem(SOURCE, str(path), start, "entry has no usable LINK (needed for its id and audio file)", shorten(raw)))
        else:
            artist, title = _split_song(song)
            entry = new_entry(
                SOURCE, path, start, key,
                artist=artist,
                title=title or stem.replace("_", " "),
                url=link,
                license_text=lic[1] if lic else None,
                license_url=lic[1] if lic and "://" in lic[1] else None,
                source_path=stem,
                candidates=_stem_candidates(stem),
                download_path=stem if has_audio_ext(stem) else f"{stem}.mp3",
            )
            if not song:
                entry.notes.append("no SONG line")
            if not lic:
                entry.notes.append("no LICENSE LINK line")
            if any(start <= n <= start + 3 for n in bad):
                entry.notes.append("line(s) not valid UTF-8, read as cp1252")
            res.entries.append(entry)
        block.clear()

    for i, text in enumerate(lines, 1):
        m = _KEY.match(text)
        if m:
            key = m.group(1).upper()
            if key == "SONG" or key in block:  # a new block starts (also when a block lacks its blank line)
                flush()
                start = i
            if not block:
                start = i
            block[key] = (i, m.group(2))
            continue
        stripped = text.strip()
        if not stripped:
            flush()
        elif stripped.startswith("#"):
            continue
        else:
            res.problems.append(Problem(SOURCE, str(path), i, "unrecognised line", shorten(stripped)))
    flush()
    return res


# --------------------------------------------------------------------------- metadata CSVs

# raw_tracks.csv (one header row) and tracks.csv (two header rows + the index-name row).
_RAW_NEEDED = ("track_id", "artist_name", "track_title", "license_title", "license_url", "track_url")


def _duration(text: str) -> float | None:
    """raw_tracks.csv writes 'MM:SS' or 'HH:MM:SS'; tracks.csv writes seconds."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        if ":" in text:
            secs = 0.0
            for part in text.split(":"):
                secs = secs * 60 + float(part)
            return secs
        return float(text)
    except ValueError:
        return None


def _tag_list(text: str) -> list[str]:
    """tracks.csv/raw_tracks.csv store tags as a Python list literal, e.g. "['rock', 'punk']"."""
    text = (text or "").strip()
    if not text or text == "[]":
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return [t.strip() for t in text.strip("[]").split(",") if t.strip()]
    return [str(v).strip() for v in value if str(v).strip()] if isinstance(value, list) else []


def _genre_tag(genre: str) -> list[str]:
    """FMA's top genre as a tag in MTG-Jamendo's `genre---<name>` form, so both sources read alike."""
    genre = genre.strip().lower()
    return [f"genre---{genre}"] if genre else []


def _metadata_entry(path: Path, line: int, track_id: str, artist: str, title: str, url: str,
                    lic_title: str, lic_url: str, duration: float | None, tags: list[str]) -> Entry | Problem:
    try:
        tid = int(float(track_id))
    except ValueError:
        return Problem(SOURCE, str(path), line, f"track_id {track_id!r} is not a number", "")
    stem = url_last_segment(url) if url else ""
    candidates = [_dataset_path(tid)] + (_stem_candidates(stem) if stem else [])
    lic_url = (lic_url or "").strip()
    return new_entry(
        SOURCE, path, line, str(tid),
        artist=clean(artist),
        title=clean(title),
        url=clean(url),
        license_text=lic_url or clean(lic_title),
        license_url=lic_url or None,
        source_path=stem or _dataset_path(tid),
        candidates=candidates,
        download_path=_dataset_path(tid),
        duration=duration,
        tags=tags,
    )


def parse_raw_tracks(path: Path) -> ParseResult:
    """FMA `raw_tracks.csv` (the API dump: track_id, artist_name, track_title, track_url, license_*)."""
    res = ParseResult()
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _RAW_NEEDED if c not in (reader.fieldnames or [])]
        if missing:
            res.problems.append(Problem(SOURCE, str(path), 1, f"not an FMA raw_tracks.csv: no column(s) {', '.join(missing)}"))
            return res
        for row in reader:
            line = reader.line_num
            if None in row:  # more cells than header columns: a broken quote
                res.problems.append(Problem(SOURCE, str(path), line, "row has more cells than the header", shorten(str(row.get("track_id")))))
                continue
            got = _metadata_entry(
                path, line, row["track_id"] or "", row["artist_name"] or "", row["track_title"] or "",
                row["track_url"] or "", row["license_title"] or "", row["license_url"] or "",
                _duration(row.get("track_duration") or ""), _tag_list(row.get("tags") or ""),
            )
            (res.problems if isinstance(got, Problem) else res.entries).append(got)
    return res


def parse_tracks_csv(path: Path) -> ParseResult:
    """FMA `tracks.csv`: two header rows (section, column) plus a `track_id` index row.

    Reads track.title, track.license, track.duration, track.tags and artist.name. tracks.csv has
    no track URL and no licence URL, so the licence comes from its title alone.
    """
    res = ParseResult()
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        try:
            top, sub = next(reader), next(reader)
        except StopIteration:
            res.problems.append(Problem(SOURCE, str(path), 1, "empty tracks.csv"))
            return res
        cols: dict[tuple[str, str], int] = {}
        section = ""
        for i, (t, s) in enumerate(zip(top, sub)):
            section = t or section  # pandas leaves repeated section names in place; tolerate blanks
            cols[(section, s)] = i
        need = [("track", "title"), ("track", "license"), ("artist", "name")]
        missing = [".".join(k) for k in need if k not in cols]
        if missing:
            res.problems.append(Problem(SOURCE, str(path), 1, f"not an FMA tracks.csv: no column(s) {', '.join(missing)}"))
            return res

        def cell(row: list[str], key: tuple[str, str]) -> str:
            i = cols.get(key)
            return row[i] if i is not None and i < len(row) else ""

        for row in reader:
            line = reader.line_num
            if not row or (row[0] == "track_id" and not any(row[1:])):
                continue  # the index-name row
            if len(row) != len(top):
                res.problems.append(Problem(SOURCE, str(path), line, f"row has {len(row)} cells, header has {len(top)}", shorten(",".join(row[:3]))))
                continue
            got = _metadata_entry(
                path, line, row[0], cell(row, ("artist", "name")), cell(row, ("track", "title")), "",
                cell(row, ("track", "license")), "", _duration(cell(row, ("track", "duration"))),
                _tag_list(cell(row, ("track", "tags"))) + _genre_tag(cell(row, ("track", "genre_top"))),
            )
            (res.problems if isinstance(got, Problem) else res.entries).append(got)
    return res


def parse_metadata(path: Path) -> ParseResult:
    """Dispatch an FMA metadata CSV by its header: raw_tracks.csv or tracks.csv."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline()
    if first.startswith("track_id,") or ",track_id," in first:
        return parse_raw_tracks(path)
    return parse_tracks_csv(path)


parse = lists_then_metadata(parse_list, parse_metadata)


def attribution(rows: list[dict], base_url: str = "") -> str:
    """The FMA_SONGS_LICENSE.md list format; parses back with `parse_list`."""
    out = ["## Training Dataset Songs - FMA", ""]
    for r in rows:
        out += [
            f"SONG: {one_line(r.get('artist')) or 'Unknown artist'} - {one_line(r.get('title'))}",
            f"LINK: {r.get('url') or r.get('track_id') or ''}",  # tracks.csv rows have no page URL
            f"LICENSE LINK: {r.get('license_url') or canonical_url(r['license'])}",
            "",
        ]
    return "\n".join(out)


SONG_SOURCE = SongSource(SOURCE, "FMA_SONGS_LICENSE.md", parse, attribution)
