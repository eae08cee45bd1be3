"""Song sources: one module per corpus, each defining a `SongSource`, registered here (docs/layout.md)."""

from __future__ import annotations

from pipeline.data.sources import fma, jamendo, wikimedia
from pipeline.data.sources.base import SongSource

SOURCES: dict[str, SongSource] = {s.name: s for s in (fma.SONG_SOURCE, jamendo.SONG_SOURCE, wikimedia.SONG_SOURCE)}
