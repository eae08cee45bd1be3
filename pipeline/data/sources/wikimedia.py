"""Wikimedia Commons: the WIKIMEDIA_SONGS_LICENSE.md markdown table and Commons API `imageinfo` JSON.

Table (header row, `| --- |` separator, one row per file):
    | FILENAME | URL | LICENSE |
    | Trnecek_op_77.opus | https://commons.wikimedia.org/wiki/File:Trnecek_op_77.ogg | [CC0](https://creativecommons.org/publicdomain/zero/1.0/) |
FILENAME is the local (often transcoded) file; URL is the Commons file page.

API JSON: the answer to `action=query&prop=imageinfo&iiprop=url|extmetadata…` (pages as a dict
or, with formatversion=2, a list), a list of such answers, or one answer per line.
Track ids: `wikimedia:<Commons file name>` with spaces as underscores
(`wikimedia:Trnecek_op_77.ogg`), so the table and the API agree.
Audio: `<audio_root>/<FILENAME>`, else `<audio_root>/<Commons file name>` (what a download writes).
"""

from __future__ import annotations

import html
import json
import logging
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.data.licenses import canonical_url, short_name
from pipeline.data.sources.base import (
    Entry,
    ParseResult,
    Problem,
    SongSource,
    clean,
    lists_then_metadata,
    new_entry,
    read_lines,
    shorten,
    strip_audio_ext,
)

log = logging.getLogger(__name__)
SOURCE = "wikimedia"
_HEADER = ("filename", "url", "license")
_SEPARATOR = re.compile(r"^:?-{3,}:?$")
_MD_LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]*)\)")


def commons_name(text: str) -> str:
    """'File:foo bar.ogg', a Commons page URL or an upload URL -> 'Foo_bar.ogg'."""
    text = text.strip()
    if "://" in text or text.startswith("//"):
        path = unquote(urlsplit(text).path)
        text = path.rsplit("/", 1)[-1]
        if "File:" in path:
            text = path.split("File:", 1)[1]
    text = re.sub(r"^(?:File|Image|Datei|Fichier)\s*:", "", text, flags=re.I)
    name = "_".join(text.split())
    # Commons titles always start with a capital letter: file:x.ogg and File:X.ogg are one page
    first = name[:1].upper()
    return first + name[1:] if len(first) == 1 else name  # ('ß'.upper() is two letters: keep it)


def _title_from_name(name: str) -> str:
    return " ".join(strip_audio_ext(name).replace("_", " ").split())


def _split_row(text: str) -> list[str]:
    """Cells of a markdown table row; `\\|` is a literal pipe inside a cell."""
    body = text.strip()
    if body.startswith("|"):
        body = body[1:]
    if body.endswith("|") and not body.endswith("\\|"):
        body = body[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _entry(path: Path, line: int, filename: str, url: str, license_cell: str) -> Entry | Problem:
    name = commons_name(url) if url else ""
    local = filename.strip()
    if not name and not local:
        return Problem(SOURCE, str(path), line, "row has neither FILENAME nor URL")
    name = name or commons_name(local)
    link = _MD_LINK.search(license_cell)
    lic_url = link.group(2) if link and "://" in link.group(2) else None
    if lic_url is None:
        m = re.search(r"https?://\S+", license_cell)
        lic_url = m.group(0) if m else None
    candidates = [c for c in dict.fromkeys([local, name]) if c]
    return new_entry(
        SOURCE, path, line, name,
        title=_title_from_name(name),
        url=url or f"https://commons.wikimedia.org/wiki/File:{name}",
        license_text=license_cell.strip() or None,
        license_url=lic_url,
        source_path=local or name,
        candidates=candidates,
        download_path=name,
    )


def parse_list(path: Path) -> ParseResult:
    """A WIKIMEDIA_SONGS_LICENSE.md markdown table."""
    lines, bad = read_lines(path)
    res = ParseResult()
    cols: dict[str, int] | None = None
    width = len(_HEADER)
    for i, text in enumerate(lines, 1):
        stripped = text.strip()
        if not stripped.startswith("|"):
            if stripped and not stripped.startswith("#"):
                res.problems.append(Problem(SOURCE, str(path), i, "text outside the table", shorten(stripped)))
            continue
        cells = _split_row(stripped)
        lowered = [c.lower() for c in cells]
        if all(_SEPARATOR.match(c) for c in cells if c) and any(cells):
            continue
        if set(_HEADER) <= set(lowered):  # (a repeated header mid-file is skipped the same way)
            cols = {h: lowered.index(h) for h in lowered if h}
            width = len(cells)
            continue
        if cols is None:
            res.problems.append(Problem(SOURCE, str(path), i, "table row before the FILENAME | URL | LICENSE header", shorten(stripped)))
            continue
        if len(cells) != width and len(cells) <= max(cols[h] for h in _HEADER):
            res.problems.append(Problem(SOURCE, str(path), i, f"row has {len(cells)} cells, the table has {width}", shorten(stripped)))
            continue
        if not any(cells):
            continue
        got = _entry(path, i, cells[cols["filename"]], cells[cols["url"]], cells[cols["license"]])
        if isinstance(got, Entry):
            # optional ARTIST / TITLE columns, when a list carries them
            if "artist" in cols and cols["artist"] < len(cells):
                got.artist = clean(cells[cols["artist"]])
            if "title" in cols and cols["title"] < len(cells) and clean(cells[cols["title"]]):
                got.title = clean(cells[cols["title"]])
            if len(cells) != width:
                got.notes.append(f"row has {len(cells)} cells, the table has {width}")
            if i in bad:
                got.notes.append("line not valid UTF-8, read as cp1252")
            res.entries.append(got)
        else:
            got.text = shorten(stripped)
            res.problems.append(got)
    if cols is None:
        res.problems.append(Problem(SOURCE, str(path), 1, "no FILENAME | URL | LICENSE table header found"))
    return res


# --------------------------------------------------------------------------- Commons API JSON


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(value: str | None) -> str | None:
    """extmetadata's Artist/ObjectName are HTML fragments: keep the visible text only."""
    if not value:
        return None
    parser = _Text()
    parser.feed(value)
    parser.close()
    return clean(html.unescape("".join(parser.parts)))


def _ext_value(meta: dict, key: str) -> str | None:
    item = meta.get(key)
    if not isinstance(item, dict):
        return None
    value = item.get("value")
    if isinstance(value, dict):  # iiextmetadatamultilang: {"en": ..., "de": ...}
        value = value.get("en") or next(iter(value.values()), None)
    return str(value) if value is not None else None


def _responses(path: Path) -> list:
    text = "\n".join(read_lines(path)[0])
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]  # one answer per line


def parse_metadata(path: Path) -> ParseResult:
    """Commons API imageinfo answers with extmetadata (LicenseShortName, LicenseUrl, Artist, ObjectName)."""
    res = ParseResult()
    try:
        answers = _responses(path)
    except json.JSONDecodeError as exc:
        res.problems.append(Problem(SOURCE, str(path), exc.lineno, f"not JSON: {exc.msg}"))
        return res
    n = 0
    for answer in answers:
        pages = (answer.get("query") or {}).get("pages") if isinstance(answer, dict) else None
        if pages is None:
            res.problems.append(Problem(SOURCE, str(path), n + 1, "answer has no query.pages"))
            continue
        for page in pages.values() if isinstance(pages, dict) else pages:
            n += 1
            title = str(page.get("title") or "")
            if page.get("missing") is not None or page.get("invalid") is not None:
                res.problems.append(Problem(SOURCE, str(path), n, f"page {title or '?'} is missing on Commons"))
                continue
            infos = page.get("imageinfo") or []
            if not title or not infos:
                res.problems.append(Problem(SOURCE, str(path), n, f"page {title or '?'} has no imageinfo"))
                continue
            info = infos[0]
            meta = info.get("extmetadata") or {}
            name = commons_name(title)
            lic_name = _ext_value(meta, "LicenseShortName") or _ext_value(meta, "License")
            lic_url = _ext_value(meta, "LicenseUrl")
            entry = new_entry(
                SOURCE, path, n, name,
                artist=html_to_text(_ext_value(meta, "Artist")),
                title=html_to_text(_ext_value(meta, "ObjectName")) or _title_from_name(name),
                url=info.get("descriptionurl") or f"https://commons.wikimedia.org/wiki/File:{name}",
                license_text=" ".join(x for x in (lic_name, lic_url) if x) or None,
                license_url=lic_url,
                source_path=name,
                candidates=[name],
                download_path=name,
                download_url=info.get("url"),
                duration=float(info["duration"]) if isinstance(info.get("duration"), (int, float)) else None,
            )
            if not lic_name and not lic_url:
                entry.notes.append("extmetadata has no LicenseShortName/LicenseUrl")
            res.entries.append(entry)
    return res


parse = lists_then_metadata(parse_list, parse_metadata)


def attribution(rows: list[dict], base_url: str = "") -> str:
    """The WIKIMEDIA_SONGS_LICENSE.md markdown table; parses back with `parse_list`."""
    out = ["### Training Dataset Songs - Wikimedia", "", "| FILENAME | URL | LICENSE |", "| --- | --- | --- |"]
    for r in rows:
        name = (r.get("source_path") or "").replace("|", "%7C")
        url = (r.get("url") or "").replace("|", "%7C")
        lic_url = r.get("license_url") or canonical_url(r["license"])
        out.append(f"| {name} | {url} | [{short_name(r['license'])}]({lic_url}) |")
    return "\n".join(out) + "\n"


SONG_SOURCE = SongSource(
    SOURCE, "WIKIMEDIA_SONGS_LICENSE.md", parse, attribution,
    download_base="https://commons.wikimedia.org/wiki/Special:FilePath",
)
