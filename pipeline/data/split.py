"""Artist-disjoint train/validation split by a stable hash.

Each artist group goes to validation when sha256(salt + group) maps below `val_ratio`. The
decision depends only on the artist and the salt, so adding or removing other songs never moves
an artist across the split (and cached features stay valid). Songs without an artist form a group
of their own, keyed by their track id.
"""

from __future__ import annotations

import hashlib
import unicodedata


# Names that say "no artist known"; grouping all their songs together would make one huge group.
PLACEHOLDER_ARTISTS = frozenset(
    {"unknown", "unknown artist", "unknown author", "anonymous", "anon", "various", "various artists", "n/a", "none", "-"}
)


def artist_group(artist: str | None, track_id: str) -> str:
    """Normalised grouping key: the same artist spelt with other case/spacing/Unicode form matches."""
    name = " ".join(unicodedata.normalize("NFKC", artist or "").casefold().split())
    if name and name not in PLACEHOLDER_ARTISTS:
        return "artist:" + name
    return "track:" + track_id


def group_fraction(group: str, salt: str) -> float:
    """Stable number in [0, 1) for a group."""
    digest = hashlib.sha256(f"{salt}\x00{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(group: str, val_ratio: float, salt: str) -> str:
    return "val" if group_fraction(group, salt) < val_ratio else "train"
