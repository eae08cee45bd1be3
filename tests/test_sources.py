"""Source parsers: the three song list formats (real excerpts + hand-made oddities) and native metadata."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.data.licenses import normalize_license
from pipeline.data.sources import fma, jamendo, wikimedia

FIX = Path(__file__).resolve().parent / "fixtures" / "ingest"
SHARED = Path(__file__).resolve().parents[2] / "shared"
SEED_LISTS = SHARED / "data" / "seed-lists"


# --------------------------------------------------------------------------- list formats, real excerpts


def test_fma_seed_excerpt() -> None:
    res = fma.parse_list(FIX / "seed" / "FMA_SONGS_LICENSE.md")
    assert res.problems == []
    first = res.entries[0]
    assert first.track_id == "fma:Aaron_Dunn/Bachs_Aria_Goldberg_Variations_BWV_988/Goldberg_Variations_BWV_988_-_Aria"
    assert (first.artist, first.title) == ("Aaron Dunn", "Goldberg Variations, BWV. 988 - Aria")
    assert first.line == 3
    assert first.candidates[0] == "Goldberg_Variations_BWV_988_-_Aria.mp3"
    assert [normalize_license(e.license_text) for e in res.entries] == [
        "public-domain", "public-domain", "public-domain", "CC-BY-3.0-US", "LicenseRef-CC-BY-2.0-FR",
    ]
    assert res.entries[2].artist == "Arrizabalaga, Bravo, Laginestra, Martinez"


def test_jamendo_seed_excerpt() -> None:
    res = jamendo.parse_list(FIX / "seed" / "MTG_JAMENDO_SONGS_LICENSE.md")
    assert res.problems == []
    assert res.meta["download_base_url"] == "https://cdn.freesound.org/mtg-jamendo/raw_30s/audio"
    ids = [e.track_id for e in res.entries]
    assert ids == ["jamendo:1091", "jamendo:1092", "jamendo:1093", "jamendo:6007"]
    e = res.entries[2]
    assert (e.title, e.artist, e.source_path) == ("Marion in the Morning", "Religionnaire", "93/1093.mp3")
    assert e.url == "http://www.jamendo.com/track/1093"
    assert normalize_license(res.entries[3].license_text) == "LicenseRef-CC-BY-2.0-FR"


def test_wikimedia_seed_excerpt() -> None:
    res = wikimedia.parse_list(FIX / "seed" / "WIKIMEDIA_SONGS_LICENSE.md")
    assert res.problems == []
    first = res.entries[0]
    assert first.track_id == "wikimedia:Andalūzijas_romance3470.wav"
    assert first.candidates == ["Andalūzijas_romance3470.opus", "Andalūzijas_romance3470.wav"]
    assert first.title == "Andalūzijas romance3470"
    lic = [normalize_license(e.license_text) for e in res.entries]
    assert lic == ["public-domain", "CC-BY-3.0", "CC0-1.0", "CC-BY-4.0", "public-domain"]


@pytest.mark.parametrize(
    ("parser", "name"),
    [(fma.parse_list, "FMA"), (jamendo.parse_list, "MTG_JAMENDO"), (wikimedia.parse_list, "WIKIMEDIA")],
)
def test_shared_sample_lists_parse_completely(parser, name: str) -> None:
    path = SEED_LISTS / f"{name}_SONGS_LICENSE.md"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared sample lists sit beside the clone only in CI")
    res = parser(path)
    text = path.read_text(encoding="utf-8")
    expected = {"FMA": text.count("\nSONG:"), "MTG_JAMENDO": text.count(" from Jamendo: "), "WIKIMEDIA": text.count("commons.wikimedia.org/wiki/File:")}[name]
    assert len(res.entries) == expected and expected > 0
    assert res.problems == []
    ids = Counter(e.track_id for e in res.entries)
    assert max(ids.values()) == 1, "track ids must be unique within a list"
    assert all(normalize_license(e.license_text) != "unknown" for e in res.entries)


# --------------------------------------------------------------------------- hand-made oddities


def test_fma_odd_entries_reported_with_line() -> None:
    res = fma.parse_list(FIX / "odd" / "FMA_SONGS_LICENSE.md")
    by_id = {e.track_id: e for e in res.entries}
    cafe = by_id["fma:Ensemble_Zoe/Live/Cafe_Nights"]
    assert cafe.artist == "Ensemble Zoé" and cafe.title == "Café Nights"  # cp1252 bytes recovered
    assert any("UTF-8" in n for n in cafe.notes)
    assert normalize_license(cafe.license_text) == "CC-BY-SA-4.0"
    assert normalize_license(by_id["fma:Plain_Words/Talks/Spoken"].license_text) == "CC-BY-3.0"
    bare = by_id["fma:No_License_Line/X/Bare"]
    assert normalize_license(bare.license_text) == "unknown" and "no LICENSE LINK line" in bare.notes
    # an entry without the blank line before the next SONG still splits correctly
    assert normalize_license(by_id["fma:Packed/X/Without_Blank_Line"].license_text) == "CC-BY-NC-ND-3.0"
    problems = {(p.line, p.detail.split(" (")[0]) for p in res.problems}
    assert problems == {(7, "entry has no usable LINK"), (14, "unrecognised line")}
    assert all(p.file.endswith("FMA_SONGS_LICENSE.md") for p in res.problems)


def test_jamendo_odd_entries() -> None:
    res = jamendo.parse_list(FIX / "odd" / "MTG_JAMENDO_SONGS_LICENSE.md")
    by_id = {e.track_id: e for e in res.entries}
    assert set(by_id) == {"jamendo:5011", "jamendo:5012", "jamendo:5013", "jamendo:5014"}
    stand = by_id["jamendo:5011"]
    assert (stand.title, stand.artist) == ("Stand by Me", "The Bänd")  # last ' by ' splits
    assert normalize_license(stand.license_text) == "CC-BY-NC-3.0"
    assert normalize_license(by_id["jamendo:5012"].license_text) == "unknown"
    assert by_id["jamendo:5013"].artist is None and normalize_license(by_id["jamendo:5013"].license_text) == "CC-BY-2.5"
    assert normalize_license(by_id["jamendo:5014"].license_text) == "public-domain"
    assert [(p.line, p.text) for p in res.problems] == [(14, "what is this line")]


def test_wikimedia_odd_rows() -> None:
    res = wikimedia.parse_list(FIX / "odd" / "WIKIMEDIA_SONGS_LICENSE.md")
    by_id = {e.track_id: e for e in res.entries}
    assert set(by_id) == {"wikimedia:Café_Tune.ogg", "wikimedia:Plain_Text.ogg", "wikimedia:Nc_Song.ogg", "wikimedia:No_Url.opus"}
    assert by_id["wikimedia:Café_Tune.ogg"].candidates == ["Café_Tune.opus", "Café_Tune.ogg"]
    assert normalize_license(by_id["wikimedia:Nc_Song.ogg"].license_text) == "CC-BY-NC-SA-2.0"
    assert normalize_license(by_id["wikimedia:No_Url.opus"].license_text) == "unknown"
    lines = sorted(p.line for p in res.problems)
    assert lines == [3, 7, 8, 12]


def test_missing_header_is_reported_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "W.md"
    path.write_bytes(b"| a.ogg | https://commons.wikimedia.org/wiki/File:a.ogg | CC0 |\n\xff\xfe\n")
    res = wikimedia.parse_list(path)
    assert res.entries == []
    assert {p.line for p in res.problems} >= {1}


# --------------------------------------------------------------------------- native metadata


def test_fma_raw_tracks_csv() -> None:
    res = fma.parse_metadata(FIX / "native" / "raw_tracks.csv")
    by_id = {e.track_id: e for e in res.entries}
    assert set(by_id) == {"fma:2", "fma:140", "fma:3001"}
    food = by_id["fma:2"]
    assert (food.artist, food.title, food.duration) == ("Field Test", "Food", 168.0)
    assert food.tags == ["punk", "lo-fi"]
    assert food.candidates[:2] == ["000/000002.mp3", "Food.mp3"]
    assert normalize_license(food.license_text) == "CC-BY-NC-SA-3.0"
    roof = by_id["fma:140"]
    assert roof.title == "Rooftops, at Night" and roof.duration == 3725.0
    assert normalize_license(roof.license_text) == "CC-BY-3.0-US"
    assert normalize_license(by_id["fma:3001"].license_text) == "unknown"
    assert [(p.line, "not a number" in p.detail) for p in res.problems] == [(6, True)]


def test_fma_tracks_csv_multi_row_header() -> None:
    res = fma.parse_metadata(FIX / "native" / "tracks.csv")
    by_id = {e.track_id: e for e in res.entries}
    assert set(by_id) == {"fma:2", "fma:5", "fma:10"}
    assert (by_id["fma:2"].artist, by_id["fma:2"].title, by_id["fma:2"].duration) == ("Field Test", "Food", 168.0)
    assert by_id["fma:2"].tags == ["punk", "genre---hip-hop"]
    assert by_id["fma:10"].tags == ["genre---pop"]
    assert normalize_license(by_id["fma:5"].license_text) == "LicenseRef-CC-BY"
    assert normalize_license(by_id["fma:10"].license_text) == "CC-BY-NC-ND-3.0"
    assert len(res.problems) == 1 and res.problems[0].line == 7


def test_jamendo_tsv_joined_with_audio_licenses() -> None:
    lic = jamendo.parse_list(FIX / "native" / "audio_licenses.txt")
    inst = jamendo.join_licenses(jamendo.parse_tsv(FIX / "native" / "autotagging_instrument.tsv"), lic)
    mood = jamendo.join_licenses(jamendo.parse_tsv(FIX / "native" / "autotagging_moodtheme.tsv"), lic)
    e948 = next(e for e in inst.entries if e.track_id == "jamendo:948")
    assert (e948.title, e948.artist, e948.duration, e948.source_path) == ("Slow Tide", "Northern Static", 212.7, "48/948.mp3")
    assert e948.tags == ["instrument---synthesizer"]
    assert normalize_license(e948.license_text) == "CC-BY-3.0"
    many = next(e for e in mood.entries if e.track_id == "jamendo:11839")
    assert many.tags == ["mood/theme---calm", "mood/theme---melodic", "mood/theme---relaxing", "mood/theme---soft"]
    assert many.artist_key == "artist_001780" and "not in the licences file" in many.notes
    assert normalize_license(many.license_text) == "unknown"


def test_jamendo_tsv_needs_its_header(tmp_path: Path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("track_1\tartist_1\n")
    res = jamendo.parse_tsv(path)
    assert res.entries == [] and "TRACK_ID" in res.problems[0].detail


def test_shared_mtg_tsvs_parse_completely() -> None:
    folder = SHARED / "data" / "mtg-jamendo"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found: the shared MTG-Jamendo TSVs sit beside the clone only in CI")
    for path in sorted(folder.glob("autotagging_*.tsv")):
        res = jamendo.parse_tsv(path)
        n_lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip())
        assert len(res.entries) == n_lines and res.problems == []
        assert all(e.tags and e.duration for e in res.entries)


def test_commons_imageinfo_v1_and_v2() -> None:
    v1 = wikimedia.parse_metadata(FIX / "native" / "commons_imageinfo.json")
    by_id = {e.track_id: e for e in v1.entries}
    waltz = by_id["wikimedia:Harbour_Waltz.ogg"]
    assert waltz.artist == "Anna Müller & the Pier Band"  # HTML stripped, entities decoded
    assert waltz.title == "Harbour Waltz" and waltz.duration == 61.2
    assert waltz.download_url == "https://upload.wikimedia.org/wikipedia/commons/a/ab/Harbour_Waltz.ogg"
    assert normalize_license(waltz.license_text) == "CC-BY-SA-4.0"
    assert normalize_license(by_id["wikimedia:Village_Dance_1921.flac"].license_text) == "public-domain"
    assert len(v1.problems) == 1 and "missing" in v1.problems[0].detail

    v2 = wikimedia.parse_metadata(FIX / "native" / "commons_imageinfo_v2.jsonl")
    (march,) = v2.entries
    assert march.track_id == "wikimedia:Clockwork_March.wav" and march.title == "Clockwork March"
    assert normalize_license(march.license_text) == "CC-BY-3.0"
    assert "Gone.ogg" in v2.problems[0].detail


def test_commons_json_garbage_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    res = wikimedia.parse_metadata(path)
    assert res.entries == [] and "not JSON" in res.problems[0].detail


def test_wikimedia_extra_columns_and_escaped_pipe(tmp_path: Path) -> None:
    path = tmp_path / "W.md"
    path.write_text(
        "| LICENSE | FILENAME | URL | ARTIST |\n|:---|---|---|---|\n"
        "| [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/) | A.opus | https://commons.wikimedia.org/wiki/File:A.ogg | Jo \\| Co |\n"
        "| FILENAME | URL | LICENSE | ARTIST |\n",  # a repeated header row is not an entry
        encoding="utf-8",
    )
    res = wikimedia.parse_list(path)
    assert res.problems == []
    (e,) = res.entries
    assert (e.track_id, e.artist, e.source_path) == ("wikimedia:A.ogg", "Jo | Co", "A.opus")
    assert normalize_license(e.license_text) == "CC-BY-4.0"


@pytest.mark.parametrize("parser", [fma.parse_list, jamendo.parse_list, wikimedia.parse_list])
def test_parsers_survive_mangled_input(parser, tmp_path: Path) -> None:
    """Dropped lines, cut lines and stray bytes anywhere: every line is an entry or a problem, never a crash."""
    import random

    rng = random.Random(0)
    sources = sorted((FIX / "seed").glob("*.md")) + sorted((FIX / "odd").glob("*.md"))
    lines = [line for src in sources for line in src.read_bytes().splitlines()]
    for trial in range(30):
        mangled = []
        for line in lines:
            r = rng.random()
            if r < 0.1:
                continue
            if r < 0.2:
                line = line[: rng.randrange(len(line) + 1)]
            elif r < 0.25:
                line = line + bytes([rng.randrange(128, 256)])
            mangled.append(line)
        path = tmp_path / f"mangled{trial}.md"
        path.write_bytes(b"\n".join(mangled))
        res = parser(path)
        for e in res.entries:
            assert e.track_id.startswith(e.source + ":") and e.line >= 1
        for p in res.problems:
            assert p.file == str(path) and p.line >= 1


def test_checksum_list_format(tmp_path: Path) -> None:
    from pipeline.data.sources.base import is_checksum_file, parse_checksums

    path = tmp_path / "autotagging_moodtheme_audio_sha256_tracks.txt"
    path.write_text(f"{'a' * 64} 63/1159663.mp3\n{'B' * 64} 77/1245177.mp3\nnot a checksum line\n")
    assert is_checksum_file(path)
    assert not is_checksum_file(FIX / "native" / "autotagging_moodtheme.tsv")
    sums, problems = parse_checksums(path)
    assert sums == {"63/1159663.mp3": "a" * 64, "77/1245177.mp3": "b" * 64}
    assert [(p.line, p.text) for p in problems] == [(3, "not a checksum line")]


def test_commons_names_normalise_like_commons_titles() -> None:
    assert wikimedia.commons_name("File:harbour waltz.ogg") == "Harbour_waltz.ogg"
    assert wikimedia.commons_name("https://commons.wikimedia.org/wiki/File:Caf%C3%A9_Tune.ogg") == "Café_Tune.ogg"
    assert wikimedia.commons_name("https://upload.wikimedia.org/wikipedia/commons/a/ab/Harbour_Waltz.ogg") == "Harbour_Waltz.ogg"
    assert wikimedia.commons_name('"Afghanistan"_(1920).mp3') == '"Afghanistan"_(1920).mp3'
