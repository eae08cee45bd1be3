"""Licence normalisation table, policy decisions and attribution files that parse back."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.licenses import canonical_url, decide, family, normalize_license, short_name
from pipeline.data.sources import SOURCES, fma, jamendo, wikimedia
from repo_params import section

TABLE = [
    # CC0 and public domain
    ("https://creativecommons.org/publicdomain/zero/1.0/", "CC0-1.0"),
    ("http://creativecommons.org/publicdomain/zero/1.0/legalcode", "CC0-1.0"),
    ("[CC0](https://creativecommons.org/publicdomain/zero/1.0/)", "CC0-1.0"),
    ("CC0", "CC0-1.0"),
    ("https://creativecommons.org/publicdomain/mark/1.0/", "public-domain"),
    ("https://creativecommons.org/licenses/publicdomain/", "public-domain"),
    ("[Public domain](https://creativecommons.org/publicdomain/)", "public-domain"),
    ("Public Domain                  ", "public-domain"),
    ("PD-old-70", "public-domain"),
    # BY, every version, http/https, slash or not, legalcode / deed.xx
    ("https://creativecommons.org/licenses/by/1.0/", "CC-BY-1.0"),
    ("http://creativecommons.org/licenses/by/2.0/", "CC-BY-2.0"),
    ("https://creativecommons.org/licenses/by/2.5", "CC-BY-2.5"),
    ("https://creativecommons.org/licenses/by/3.0/legalcode", "CC-BY-3.0"),
    ("https://creativecommons.org/licenses/by/4.0", "CC-BY-4.0"),
    ("https://creativecommons.org/licenses/by/4.0/deed.de", "CC-BY-4.0"),
    ("creativecommons.org/licenses/by/4.0/", "CC-BY-4.0"),
    # jurisdiction ports: SPDX id where SPDX has one, LicenseRef otherwise
    ("https://creativecommons.org/licenses/by/3.0/us/", "CC-BY-3.0-US"),
    ("http://creativecommons.org/licenses/by/2.0/fr/", "LicenseRef-CC-BY-2.0-FR"),
    ("http://creativecommons.org/licenses/by/2.5/se/", "LicenseRef-CC-BY-2.5-SE"),
    ("[CC BY 2.5 nl](https://creativecommons.org/licenses/by/2.5/nl/)", "LicenseRef-CC-BY-2.5-NL"),
    ("https://creativecommons.org/licenses/by-sa/3.0/de/legalcode", "CC-BY-SA-3.0-DE"),
    # other elements
    ("https://creativecommons.org/licenses/by-sa/4.0/", "CC-BY-SA-4.0"),
    ("https://creativecommons.org/licenses/by-nc/4.0/", "CC-BY-NC-4.0"),
    ("http://creativecommons.org/licenses/by-nc-sa/3.0/", "CC-BY-NC-SA-3.0"),
    ("https://creativecommons.org/licenses/by-nd/2.0/", "CC-BY-ND-2.0"),
    ("https://creativecommons.org/licenses/by-nc-nd/4.0/", "CC-BY-NC-ND-4.0"),
    ("https://creativecommons.org/licenses/by-nd-nc/1.0/", "CC-BY-NC-ND-1.0"),
    # plain text names
    ("Creative Commons Attribution 3.0", "CC-BY-3.0"),
    ("CC BY 4.0", "CC-BY-4.0"),
    ("CC BY-SA 4.0", "CC-BY-SA-4.0"),
    ("CC BY-SA 3.0 de", "CC-BY-SA-3.0-DE"),
    ("cc-by-sa-3.0,2.5,2.0,1.0", "CC-BY-SA-3.0"),
    ("Attribution-NonCommercial", "LicenseRef-CC-BY-NC"),
    ("Attribution", "LicenseRef-CC-BY"),
    ("Attribution-NonCommercial-ShareAlike 3.0 International", "CC-BY-NC-SA-3.0"),
    ("Attribution-NonCommercial-NoDerivatives (aka Music Sharing) 3.0 International", "CC-BY-NC-ND-3.0"),
    ("Available under a Creative Commons Attribution-Non-Commercial-Share-Alike license", "LicenseRef-CC-BY-NC-SA"),
    # a URL wins over the words around it
    ("a Creative Commons Attribution license http://creativecommons.org/licenses/by-nc/2.5/", "CC-BY-NC-2.5"),
    # unknown
    ("", "unknown"),
    (None, "unknown"),
    ("GFDL", "unknown"),
    ("All rights reserved", "unknown"),
    ("https://creativecommons.org/licenses/sampling+/1.0/", "unknown"),
    ("https://example.org/my-licence", "unknown"),
]


@pytest.mark.parametrize(("text", "expected"), TABLE)
def test_normalize_license_table(text: str | None, expected: str) -> None:
    assert normalize_license(text) == expected


def test_family_version_and_urls_round_trip() -> None:
    for lid in ("CC-BY-4.0", "CC-BY-NC-SA-3.0", "CC-BY-3.0-US", "LicenseRef-CC-BY-2.0-FR", "CC0-1.0", "public-domain"):
        assert normalize_license(canonical_url(lid)) == lid
    assert family("LicenseRef-CC-BY-2.0-FR") == "by"
    assert family("CC-BY-NC-ND-4.0") == "by-nc-nd"
    assert family("unknown") == "unknown" and canonical_url("unknown") == ""
    assert short_name("LicenseRef-CC-BY-2.5-NL") == "CC BY 2.5 nl"


DEFAULT = section("ingest.policy")


@pytest.mark.parametrize(
    ("lid", "allowed"),
    [
        ("public-domain", True),
        ("CC0-1.0", True),
        ("CC-BY-2.0", True),
        ("LicenseRef-CC-BY-2.0-FR", True),
        ("CC-BY-SA-4.0", False),
        ("CC-BY-NC-4.0", False),
        ("CC-BY-ND-4.0", False),
        ("CC-BY-NC-SA-3.0", False),
        ("unknown", False),
    ],
)
def test_default_policy(lid: str, allowed: bool) -> None:
    ok, reason = decide(lid, DEFAULT)
    assert ok is allowed
    assert (reason == "") is allowed


def test_policy_switches_and_reasons() -> None:
    with_sa = section("ingest.policy", allow_by_sa=True)
    assert decide("CC-BY-SA-4.0", with_sa).allowed
    # NC-SA needs both switches: BY-SA alone is not enough
    ok, reason = decide("CC-BY-NC-SA-4.0", with_sa)
    assert not ok and "allow_nc" in reason and "allow_by_sa" not in reason
    assert decide("CC-BY-NC-SA-4.0", section("ingest.policy", allow_by_sa=True, allow_nc=True)).allowed
    assert decide("unknown", DEFAULT).reason == "unknown licence"
    assert decide("unknown", section("ingest.policy", allow_unknown=True)).allowed
    no_pd = section("ingest.policy", allow_public_domain=False)
    ok, reason = decide("public-domain", no_pd)
    assert not ok and "allow_public_domain" in reason
    assert not decide("CC-BY-4.0", section("ingest.policy", allow_by=False)).allowed


ROWS = {
    "fma": [
        {"artist": "Lumen Quartet", "title": "Morning Walk", "url": "https://freemusicarchive.org/music/Lumen_Quartet/Demo/Morning_Walk",
         "license": "CC-BY-4.0", "license_url": "https://creativecommons.org/licenses/by/4.0/", "source_path": "Morning_Walk",
         "track_id": "fma:Lumen_Quartet/Demo/Morning_Walk"},
        {"artist": "Basalt", "title": "Iron - Steps", "url": "https://freemusicarchive.org/music/Basalt/Demo/Iron_Steps",
         "license": "public-domain", "license_url": None, "source_path": "Iron_Steps", "track_id": "fma:Basalt/Demo/Iron_Steps"},
        # from tracks.csv: no page URL, the id stands in
        {"artist": "Field Test", "title": "This World", "url": None, "license": "LicenseRef-CC-BY", "license_url": None,
         "source_path": "000/000005.mp3", "track_id": "fma:5"},
    ],
    "jamendo": [
        {"artist": "Kettle Lane", "title": "Sunday by Night", "url": "http://www.jamendo.com/track/1001", "license": "CC-BY-3.0",
         "license_url": "http://creativecommons.org/licenses/by/3.0/", "source_path": "01/1001.mp3", "track_id": "jamendo:1001"},
    ],
    "wikimedia": [
        {"artist": None, "title": "Prelude in D", "url": "https://commons.wikimedia.org/wiki/File:Prelude_in_D.ogg", "license": "CC0-1.0",
         "license_url": "https://creativecommons.org/publicdomain/zero/1.0/", "source_path": "Prelude_in_D.opus",
         "track_id": "wikimedia:Prelude_in_D.ogg"},
    ],
}
PARSERS = {"fma": fma.parse_list, "jamendo": jamendo.parse_list, "wikimedia": wikimedia.parse_list}


@pytest.mark.parametrize("source", sorted(ROWS))
def test_attribution_file_parses_back(source: str, tmp_path: Path) -> None:
    rows = ROWS[source]
    text = SOURCES[source].attribution(rows, "https://cdn.example.org/audio")
    path = tmp_path / SOURCES[source].attribution_file
    path.write_text(text, encoding="utf-8")
    parsed = PARSERS[source](path)
    assert parsed.problems == []
    assert [e.track_id for e in parsed.entries] == [r["track_id"] for r in rows]
    assert [normalize_license(e.license_text) for e in parsed.entries] == [r["license"] for r in rows]
    assert [e.title for e in parsed.entries] == [r["title"] for r in rows]
    if source != "wikimedia":
        assert [e.artist for e in parsed.entries] == [r["artist"] for r in rows]
    if source == "jamendo":
        assert parsed.meta["download_base_url"] == "https://cdn.example.org/audio"
