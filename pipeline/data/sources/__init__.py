"""Song sources: one module per corpus, each defining a `SongSource`, registered here.

Adding a corpus: write `pipeline/data/sources/<name>.py` (parse its lists and metadata into
`Entry` rows, render its attribution file) and add its `SONG_SOURCE` to the table below.
"""

from __future__ import annotations

from pipeline.data.sources import fma, jamendo, wikimedia
from pipeline.data.sources.base import SongSource

SOURCES: dict[str, SongSource] = {s.name: s for s in (fma.SONG_SOURCE, jamendo.SONG_SOURCE, wikimedia.SONG_SOURCE)}
