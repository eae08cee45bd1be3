"""MTG-Jamendo: the MTG_JAMENDO_SONGS_LICENSE.md list (same block format as the dataset's `audio_licenses.txt`) and
the dataset's autotagging TSVs.

List/licence block:
    91/1091.mp3
    Intro by Religionnaire from Jamendo: http://www.jamendo.com/track/1091
    Available under a Creative Commons Attribution license: http://creativecommons.org/licenses/by/2.0/

TSV: `TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS...`, tab-separated, every tag its own
column after DURATION (`genre---rock`, `instrument---piano`, `mood/theme---calm`).
Track ids: `jamendo:<number>` (`track_0001091` and `91/1091.mp3` both give `jamendo:1091`).
Audio: `<audio_root>/<PATH>` (or the `.low.mp3` file of the dataset's low-bitrate copy).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pipeline.data.licenses import canonical_url, long_name, one_line
from pipeline.data.sources.base import (
    Entry, ParseResult, Problem, SongSource, SourceFiles, clean, new_entry, read_lines, shorten
)

log = logging.getLogger(__name__)
SOURCE = "jamendo"

_PATH = re.compile(r"^\s*((?:[\w.-]+/)*([\w.-]+?)\.(?:low\.)?(mp3|ogg|opus|flac|wav))\s*$", re.I)
_FROM = re.compile(r"^(?P<head>.*)\s+from\s+Jamendo\s*:\s*(?P<url>\S+)\s*$", re.I)
_AVAILABLE = re.compile(r"^\s*Available\s+under\s+(?P<name>.*?)\s*:\s*(?P<url>\S+)\s*$", re.I)
_AVAILABLE_NOURL = re.compile(r"^\s*Available\s+under\s+(?P<name>.*?)\.?\s*$", re.I)
_HEADER_URL = re.compile(r"downloaded\s+from\s+.*?:\s*(https?://\S+)", re.I)
_TRACK_NUM = re.compile(r"(\d+)")


def _candidates(rel: str) -> list[str]:
    if rel.endswith(".low.mp3"):
        return [rel, rel[: -len(".low.mp3")] + ".mp3"]
    if rel.endswith(".mp3"):
        return [rel, rel[: -len(".mp3")] + ".low.mp3"]
    return [rel]


def _num(text: str) -> str | None:
    m = _TRACK_NUM.findall(text or "")
    return str(int(m[-1])) if m else None


def parse_list(path: Path) -> ParseResult:
    """An MTG_JAMENDO_SONGS_LICENSE.md list or the dataset's audio_licenses.txt."""
    lines, bad = read_lines(path)
    res = ParseResult()
    current: Entry | None = None

    def finish(e: Entry | None) -> None:
        if e is None:
            return
        if e.url is None:
            e.notes.append("no 'by … from Jamendo' line")
        if e.license_text is None:
            e.notes.append("no 'Available under …' line")
        res.entries.append(e)

    for i, text in enumerate(lines, 1):
        stripped = text.strip()
        if not stripped or stripped in ("--", "---"):
            continue
        m = _PATH.match(stripped)
        if m:
            finish(current)
            rel = m.group(1)
            num = _num(m.group(2))
            current = new_entry(SOURCE, path, i, num or rel, source_path=rel, candidates=_candidates(rel),
                                download_path=rel)
            if i in bad:
                current.notes.append("line not valid UTF-8, read as cp1252")
            continue
        if current is None:
            hm = _HEADER_URL.search(stripped)
            if hm:
                res.meta["download_base_url"] = hm.group(1).rstrip("/")
            elif not stripped.startswith("#") and "list of the specific songs" not in stripped.lower():
                res.problems.append(Problem(SOURCE, str(path), i, "text outside any entry", shorten(stripped)))
            continue
        if i in bad and "line not valid UTF-8, read as cp1252" not in current.notes:
            current.notes.append("line not valid UTF-8, read as cp1252")
        fm = _FROM.match(stripped)
        am = _AVAILABLE.match(stripped) or _AVAILABLE_NOURL.match(stripped)
        if fm and current.url is None:
            head = fm.group("head")
            if " by " in head:
                title, artist = head.rsplit(" by ", 1)  # titles hold ' by ' more often than artists
            else:
                title, artist = head, ""
            current.title, current.artist = clean(title), clean(artist)
            current.url = fm.group("url")
            url_num = _num(current.url)
            if url_num and current.track_id != f"{SOURCE}:{url_num}":
                current.notes.append(f"page URL names track {url_num}, path names {current.track_id}")
        elif am and current.license_text is None:
            url = am.groupdict().get("url")
            current.license_url = url if url and "://" in url else None
            current.license_text = " ".join(x for x in (am.group("name"), url) if x)
        else:
            res.problems.append(Problem(SOURCE, str(path), i, f"unrecognised line in the entry of {current.source_path}", shorten(stripped)))
    finish(current)
    return res


def parse_tsv(path: Path) -> ParseResult:
    """An MTG-Jamendo autotagging TSV. Carries no licence: join with audio_licenses.txt."""
    lines, bad = read_lines(path)
    res = ParseResult()
    if not lines or not lines[0].startswith("TRACK_ID"):
        res.problems.append(Problem(SOURCE, str(path), 1, "not an MTG-Jamendo TSV: the header must start with TRACK_ID", shorten(lines[0] if lines else "")))
        return res
    for i, text in enumerate(lines[1:], 2):
        if not text.strip():
            continue
        cells = text.rstrip("\r\n").split("\t")
        if len(cells) < 5:
            res.problems.append(Problem(SOURCE, str(path), i, f"{len(cells)} tab-separated cells, need at least 5", shorten(text)))
            continue
        track, artist_id, _album, rel, dur = (c.strip() for c in cells[:5])
        num = _num(track) or _num(rel.rsplit("/", 1)[-1])
        if not num or not rel:
            res.problems.append(Problem(SOURCE, str(path), i, "no track number or PATH", shorten(text)))
            continue
        try:
            duration = float(dur)
        except ValueError:
            duration = None
        entry = new_entry(
            SOURCE, path, i, num,
            artist_key=artist_id or None,
            source_path=rel,
            candidates=_candidates(rel),
            download_path=rel,
            duration=duration,
            tags=[t.strip() for t in cells[5:] if t.strip()],
        )
        if i in bad:
            entry.notes.append("line not valid UTF-8, read as cp1252")
        res.entries.append(entry)
    return res


def join_licenses(tsv: ParseResult, licenses: ParseResult) -> ParseResult:
    """Fill title/artist/page/licence of TSV entries from audio_licenses.txt entries (by id)."""
    by_id = {e.track_id: e for e in licenses.entries}
    for e in tsv.entries:
        lic = by_id.get(e.track_id)
        if lic is None:
            e.notes.append("not in the licences file")
            continue
        e.title, e.artist, e.url = lic.title, lic.artist, lic.url
        e.license_text, e.license_url = lic.license_text, lic.license_url
    return tsv


def parse(files: SourceFiles) -> ParseResult:
    """Song lists, plus TSV metadata whose licences are joined from `licenses_file` by track id."""
    res = ParseResult()
    for path in files.lists:
        res.extend(parse_list(path))
    if files.metadata:
        lic = ParseResult()
        if files.licenses_file is not None:
            lic = parse_list(files.licenses_file)
            res.problems += lic.problems
        else:
            log.warning("ingest.sources.jamendo.licenses_file is empty: TSV tracks have no licence and are excluded")
        for path in files.metadata:
            res.extend(join_licenses(parse_tsv(path), lic))
    return res


def attribution(rows: list[dict], base_url: str = "") -> str:
    """The dataset's `audio_licenses.txt` block format; parses back with `parse_list`."""
    out = ["## Training Dataset Songs - MTG JAMENDO"]
    if base_url:
        out.append(f"The MTG-Jamendo dataset was downloaded from freesound.org: {base_url}")
    out += ["Below the list of the specific songs used and their license.", ""]
    for r in rows:
        out += [
            r.get("source_path") or "",
            f"{one_line(r.get('title'))} by {one_line(r.get('artist')) or 'Unknown artist'} from Jamendo: {r.get('url') or ''}",
            f"Available under a {long_name(r['license'])} license: {r.get('license_url') or canonical_url(r['license'])}",
            "",
        ]
    return "\n".join(out)


SONG_SOURCE = SongSource(SOURCE, "MTG_JAMENDO_SONGS_LICENSE.md", parse, attribution)
