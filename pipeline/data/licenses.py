"""Licences: URL or free text -> SPDX id, the inclusion policy, and attribution rendering.

Ids as docs/songs.md lists them; Wikimedia's `PD-old`/`PD-US` templates are `public-domain` too, and
a CC licence named without a version gets a `LicenseRef-CC-BY` style id.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import urlsplit

PUBLIC_DOMAIN = "public-domain"
CC0 = "CC0-1.0"
UNKNOWN = "unknown"

# Ports that have their own SPDX identifier (SPDX licence list); other ports get a LicenseRef.
SPDX_PORTS = frozenset(
    {
        "CC-BY-2.5-AU", "CC-BY-3.0-AT", "CC-BY-3.0-AU", "CC-BY-3.0-DE", "CC-BY-3.0-IGO",
        "CC-BY-3.0-NL", "CC-BY-3.0-US", "CC-BY-NC-3.0-DE", "CC-BY-NC-ND-3.0-DE",
        "CC-BY-NC-ND-3.0-IGO", "CC-BY-NC-SA-2.0-DE", "CC-BY-NC-SA-2.0-FR", "CC-BY-NC-SA-2.0-UK",
        "CC-BY-NC-SA-3.0-DE", "CC-BY-NC-SA-3.0-IGO", "CC-BY-ND-3.0-DE", "CC-BY-SA-2.0-UK",
        "CC-BY-SA-2.1-JP", "CC-BY-SA-3.0-AT", "CC-BY-SA-3.0-DE", "CC-BY-SA-3.0-IGO",
    }
)  # fmt: skip

_FAMILY_NAMES = {
    "by": "Attribution",
    "by-sa": "Attribution-ShareAlike",
    "by-nc": "Attribution-NonCommercial",
    "by-nc-sa": "Attribution-NonCommercial-ShareAlike",
    "by-nd": "Attribution-NoDerivatives",
    "by-nc-nd": "Attribution-NonCommercial-NoDerivatives",
}

_CC_URL = re.compile(r"(?:https?://)?(?:[a-z]+\.)?creativecommons\.org/[^\s)\]|>\"']*", re.I)
_VERSION = re.compile(r"^\d+(?:\.\d+)?$")
_ID = re.compile(r"^(?:LicenseRef-)?CC-(BY(?:-NC)?(?:-SA|-ND)?)(?:-(\d+\.\d+))?(?:-([A-Z]+))?$")


def _make_id(family: str, version: str | None, port: str | None) -> str:
    """The id of a CC BY family (a key of _FAMILY_NAMES) at a version and port."""
    base = "CC-" + family.upper()
    if not version:
        return "LicenseRef-" + base
    if "." not in version:
        version += ".0"
    spdx = f"{base}-{version}"
    if not port:
        return spdx
    ported = f"{spdx}-{port.upper()}"
    return ported if ported in SPDX_PORTS else "LicenseRef-" + ported


def _from_url(url: str) -> str | None:
    """SPDX id for a creativecommons.org URL, or None when the path is not a licence."""
    path = urlsplit(url if "//" in url else "//" + url).path
    segs = [s for s in path.lower().split("/") if s]
    # Drop the document variants of the same licence: legalcode(.xx), deed.xx, rdf.
    segs = [s for s in segs if not s.startswith(("legalcode", "deed", "rdf", "index."))]
    if not segs:
        return None
    if segs[0] == "publicdomain":
        if len(segs) > 1 and segs[1] == "zero":
            return CC0
        return PUBLIC_DOMAIN  # publicdomain/mark/1.0 and the bare publicdomain/ page
    if segs[0] != "licenses" or len(segs) < 2:
        return None
    code = segs[1]
    if code == "publicdomain":
        return PUBLIC_DOMAIN
    family = "by-nc-nd" if code == "by-nd-nc" else code  # CC 1.0 spelt BY-NC-ND as "by-nd-nc"
    if family not in _FAMILY_NAMES:
        return UNKNOWN  # sampling+, devnations, nc-sa 1.0 without BY, ...
    version = segs[2] if len(segs) > 2 and _VERSION.match(segs[2]) else None
    port = segs[3] if version and len(segs) > 3 and re.fullmatch(r"[a-z]{2,3}|scotland", segs[3]) else None
    return _make_id(family, version, port)


_TEXT_SUBS = [
    (re.compile(r"creative\s*commons"), " cc "),
    (re.compile(r"non[\s-]*commercial"), " nc "),
    (re.compile(r"share[\s-]*alike"), " sa "),
    (re.compile(r"no[\s-]*deriv(?:ative)?s?|no[\s-]*derivative[\s-]*works"), " nd "),
    (re.compile(r"attribution"), " by "),
    (re.compile(r"public[\s-]*domain"), " pd "),
    (re.compile(r"\bcc[\s-]*zero\b|\bcc-?0\b|\bzero\b"), " cc0 "),
]


def _from_text(text: str) -> str:
    t = text.lower().strip()
    for pat, rep in _TEXT_SUBS:
        t = pat.sub(rep, t)
    tokens = re.findall(r"[a-z0-9]+(?:\.\d+)?", t.replace("_", " "))
    toks = set(tokens)
    if "cc0" in toks:
        return CC0
    if "pd" in toks or t.startswith("pd-") or "pdm" in toks:
        return PUBLIC_DOMAIN
    if "by" not in toks:
        return UNKNOWN  # NC/SA/ND without BY only existed in CC 1.0: treat as unrecognised
    family = "by" + ("-nc" if "nc" in toks else "") + ("-sa" if "sa" in toks else "") + ("-nd" if "nd" in toks else "")
    if family not in _FAMILY_NAMES:  # both SA and ND: contradictory
        return UNKNOWN
    version = next((tok for tok in tokens if _VERSION.match(tok) and 1 <= float(tok) <= 4.0), None)
    port = None
    if version:
        after = tokens[tokens.index(version) + 1 :]
        if after and re.fullmatch(r"[a-z]{2}|igo", after[0]) and after[0] not in ("by", "nc", "sa", "nd", "cc"):
            port = after[0]
    return _make_id(family, version, port)


def normalize_license(value: str | None) -> str:
    """SPDX id (or `public-domain` / `unknown`) for a licence URL, a markdown link or a name.

    A creativecommons.org URL anywhere in the text wins over the words around it.
    """
    if not value or not value.strip():
        return UNKNOWN
    m = _CC_URL.search(value)
    if m:
        got = _from_url(m.group(0))
        if got is not None and got != UNKNOWN:
            return got
    return _from_text(re.sub(r"\(?https?://\S+\)?", " ", value))


def family(license_id: str) -> str:
    """Policy family of a normalised id: public-domain, cc0, by, by-sa, by-nc, by-nc-sa, by-nd, by-nc-nd or unknown."""
    if license_id == PUBLIC_DOMAIN:
        return "public-domain"
    if license_id == CC0:
        return "cc0"
    m = _ID.match(license_id)
    return m.group(1).lower() if m else "unknown"


def canonical_url(license_id: str) -> str:
    """The creativecommons.org deed of a normalised id ('' for unknown)."""
    if license_id == PUBLIC_DOMAIN:
        return "https://creativecommons.org/publicdomain/mark/1.0/"
    if license_id == CC0:
        return "https://creativecommons.org/publicdomain/zero/1.0/"
    m = _ID.match(license_id)
    if not m:
        return ""
    fam, version, port = m.group(1).lower(), m.group(2), m.group(3)
    url = f"https://creativecommons.org/licenses/{fam}/"
    if version:
        url += f"{version}/"
        if port:
            url += f"{port.lower()}/"
    return url


def short_name(license_id: str) -> str:
    """Human short name as the lists write it: 'CC BY 3.0', 'CC BY-NC-SA 2.0 fr', 'CC0', 'Public domain'."""
    if license_id == PUBLIC_DOMAIN:
        return "Public domain"
    if license_id == CC0:
        return "CC0"
    m = _ID.match(license_id)
    if not m:
        return "Unknown licence"
    parts = ["CC", m.group(1)]
    if m.group(2):
        parts.append(m.group(2))
    if m.group(3):
        parts.append(m.group(3).lower())
    return " ".join(parts)


def long_name(license_id: str) -> str:
    """'Creative Commons Attribution-ShareAlike' style name (no version), as the MTG list writes it."""
    fam = family(license_id)
    if fam in _FAMILY_NAMES:
        return "Creative Commons " + _FAMILY_NAMES[fam]
    if fam == "cc0":
        return "Creative Commons CC0"
    if fam == "public-domain":
        return "Public Domain"
    return "unknown"


# --------------------------------------------------------------------------- policy


class Decision(NamedTuple):  # callers unpack `allowed, reason = decide(...)`
    allowed: bool
    reason: str  # "" when allowed; "unknown licence" / "licence not allowed: <id> (<switch>)"


def decide(license_id: str, policy) -> Decision:
    """Apply `params.ingest.policy` (a LicensePolicyParams) to a normalised licence id.

    An element that is off excludes the licence even when others are on: CC BY-NC-SA needs
    `allow_nc` and `allow_by_sa`, CC BY-NC-ND needs `allow_nc` and `allow_nd`.
    """
    fam = family(license_id)
    if fam == "unknown":
        return Decision(True, "") if policy.allow_unknown else Decision(False, "unknown licence")
    if fam == "public-domain":
        needed = ["allow_public_domain"]
    elif fam == "cc0":
        needed = ["allow_cc0"]
    else:
        needed = ["allow_by"]
        if "-nc" in fam:
            needed.append("allow_nc")
        if "-sa" in fam:
            needed.append("allow_by_sa")
        if "-nd" in fam:
            needed.append("allow_nd")
    missing = [k for k in needed if not getattr(policy, k)]
    if missing:
        return Decision(False, f"licence not allowed: {license_id} ({', '.join(k + ' is false' for k in missing)})")
    return Decision(True, "")


# --------------------------------------------------------------------------- attribution files


def one_line(text: str | None) -> str:
    """Attribution fields on one line (a stray newline would break the list format)."""
    return " ".join((text or "").split())
