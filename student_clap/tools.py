"""What a library does with its index besides text search: "more like this song" and duplicates.

- similar: a song's nearest neighbours from its stored vector (nothing decoded when the song is
  in the index; a file that is not is embedded first), the song itself first;
- duplicates: groups of probable copies of one recording (transcodes, other bitrates, gain
  changes, trimmed silence): every pair at or above a threshold, joined into groups. The score is
  the centred cosine: both vectors minus the library's mean vector (stored with the threshold),
  as the project judges students (the raw cosine is inflated by the direction all songs share,
  so distinct songs of one genre sit close to copies);
- calibrate: that threshold, measured on the user's own songs: copies of a sample of indexed songs
  are made (re-encoded to Ogg Vorbis and MP3 at a low bitrate, 6 dB quieter, leading and trailing
  silence trimmed, or padded where there is none), their cosine to the stored vector is the
  "same recording" side, the cosine between distinct indexed songs the other; the threshold is
  stored in the index with the false-positive and false-negative rates it implies.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from student_clap.index import Index, IndexWriter, read_index
from student_clap.spec import SearchError

log = logging.getLogger(__name__)

THRESHOLD_KEY = "duplicate_threshold"
CALIBRATION_KEY = "duplicate_calibration"
CENTRE_KEY = "duplicate_centre"  # the library mean the threshold was measured around (JSON list)
CALIBRATE_SONGS = 20  # songs sampled for calibration (each gives one copy per variant)
NEGATIVE_SONGS = 2000  # distinct-song pairs are measured among at most this many songs
BLOCK = 2048  # rows of the similarity matrix computed at once (memory: BLOCK x n floats)
COPY_RATE = 44100
SILENCE_DBFS = -50.0  # below this a sample counts as silence when trimming


def index_key(path: str | Path) -> str:
    """How the index names a file: its folder resolved, its own name kept (as `index` scans)."""
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def similar(index: Index, song: str | Path, k: int, embed=None) -> list[tuple[str, float]]:
    """The song first (cosine 1), then its k-1 nearest other songs. `embed(path) -> vector` is
    called only for a file not in the index; SearchError when there is none or no such file."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    key = index_key(song)
    try:
        row = index.paths.index(key)
    except ValueError:
        row = -1
    if row >= 0:
        vec = index.vectors[row]
    else:
        if not Path(song).is_file():
            raise SearchError(f"{song}: not in {index.source} and not a file")
        if embed is None:
            raise SearchError(f"{song}: not in {index.source}; an audio model is needed to embed it")
        vec = np.asarray(embed(song), np.float32)
    scores = index.vectors @ vec
    if row >= 0:
        scores[row] = -np.inf  # listed first by name, not by a float16 score a copy could tie
    order = np.argsort(-scores, kind="stable")[: k - 1]
    return [(key if row < 0 else index.paths[row], 1.0)] + [(index.paths[i], float(scores[i])) for i in order]


def _pairs_at_least(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Every pair i < j with cosine >= threshold, computed in blocks of rows."""
    out = []
    for start in range(0, len(vectors), BLOCK):
        block = vectors[start:start + BLOCK] @ vectors.T
        rows, cols = np.nonzero(block >= threshold)
        for r, c in zip(rows, cols):
            i = start + int(r)
            if i < c:
                out.append((i, int(c), float(block[r, c])))
    return out


def centred(vectors: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Unit vectors of `vectors - centre` (rows)."""
    x = np.asarray(vectors, np.float32) - np.asarray(centre, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def duplicate_groups(index: Index, threshold: float, centre: np.ndarray | None = None) -> list[list[tuple[str, float]]]:
    """Groups of songs joined by pairs at centred cosine >= threshold (each song with its best
    score to another member), largest first. `centre`: the calibrated one, else the index's mean."""
    vectors = centred(index.vectors, index.vectors.mean(axis=0) if centre is None else centre)
    parent = list(range(len(index.paths)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[int, float] = {}
    for i, j, s in _pairs_at_least(vectors, threshold):
        parent[find(i)] = find(j)
        best[i], best[j] = max(best.get(i, -1.0), s), max(best.get(j, -1.0), s)
    groups: dict[int, list[int]] = {}
    for i in best:
        groups.setdefault(find(i), []).append(i)
    out = [sorted(((index.paths[i], best[i]) for i in members)) for members in groups.values()]
    return sorted(out, key=lambda g: (-len(g), g[0][0]))


def stored_threshold(index: Index) -> tuple[float, np.ndarray] | None:
    """(threshold, centre) stored by `duplicates calibrate`, or None."""
    value, centre = index.meta.get(THRESHOLD_KEY), index.meta.get(CENTRE_KEY)
    if value is None or centre is None:
        return None
    try:
        return float(value), np.array(json.loads(centre), np.float32)
    except (ValueError, TypeError) as exc:
        raise SearchError(f"{index.source}: the stored duplicate threshold is unreadable ({exc}); "
                          "run `student-clap duplicates calibrate` again") from None


# --------------------------------------------------------------------------- calibration


def _trimmed(wave: np.ndarray) -> np.ndarray:
    """Leading and trailing silence cut off; a song without any gets 1 s of it on both ends
    instead (the other direction of the same edit)."""
    loud = np.nonzero(np.abs(wave) > 10 ** (SILENCE_DBFS / 20))[0]
    if len(loud) and (loud[0] > COPY_RATE // 10 or len(wave) - loud[-1] > COPY_RATE // 10):
        return wave[loud[0]:loud[-1] + 1]
    pad = np.zeros(COPY_RATE, wave.dtype)
    return np.concatenate([pad, wave, pad])


def make_copies(path: str | Path, folder: Path) -> dict[str, Path]:
    """Copies of one song as a library gets them: {variant: file}."""
    import soundfile as sf

    from student_clap.audio import decode

    wave = decode(path, COPY_RATE).astype(np.float32)
    stem = folder / Path(path).stem
    out = {}
    sf.write(f"{stem}.ogg", wave, COPY_RATE, format="OGG", subtype="VORBIS", compression_level=0.9)
    out["ogg-vorbis-low"] = Path(f"{stem}.ogg")
    if "MP3" in sf.available_formats():  # libsndfile >= 1.1
        sf.write(f"{stem}.mp3", wave, COPY_RATE, format="MP3", subtype="MPEG_LAYER_III", compression_level=0.9)
        out["mp3-low-bitrate"] = Path(f"{stem}.mp3")
    sf.write(f"{stem}.gain.flac", wave * np.float32(10 ** (-6 / 20)), COPY_RATE)
    out["gain-6dB"] = Path(f"{stem}.gain.flac")
    sf.write(f"{stem}.trim.flac", _trimmed(wave), COPY_RATE)
    out["trim-silence"] = Path(f"{stem}.trim.flac")
    return out


@dataclass
class Calibration:
    threshold: float
    centre: list[float]
    false_positive_rate: float  # of distinct-song pairs at or above the threshold (copies already in
    # the library are among those pairs and count here: an upper bound)
    false_negative_rate: float  # of copies below it
    n_songs: int
    n_copies: int
    n_distinct_pairs: int
    copies_min: float
    distinct_max: float
    per_variant_min: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [f"threshold {self.threshold:.5f} (centred cosine)",
                f"copies: {self.n_copies} of {self.n_songs} songs, lowest cosine {self.copies_min:.5f}; per variant: "
                + ", ".join(f"{k} {v:.5f}" for k, v in sorted(self.per_variant_min.items())),
                f"distinct songs: {self.n_distinct_pairs} pairs, highest cosine {self.distinct_max:.5f}",
                f"false-negative rate {self.false_negative_rate:.4f} (copies below the threshold), "
                f"false-positive rate {self.false_positive_rate:.6f} (distinct pairs at or above it)"]


def choose_threshold(copies: np.ndarray, distinct: np.ndarray) -> float:
    """Halfway between the lowest copy and the highest distinct pair when they separate; otherwise
    the cut with the fewest errors, each side weighted by its rate (so the many distinct pairs do
    not outvote the copies)."""
    lo, hi = float(copies.min()), float(distinct.max()) if len(distinct) else -1.0
    if lo > hi:
        return (lo + hi) / 2
    cands = np.unique(np.concatenate([copies, distinct]))
    fnr = np.searchsorted(np.sort(copies), cands, side="left") / len(copies)
    fpr = 1 - np.searchsorted(np.sort(distinct), cands, side="left") / len(distinct)
    return float(cands[int(np.argmin(fnr + fpr))])


def calibrate(index: Index, embed, *, songs: int = CALIBRATE_SONGS, seed: int = 0) -> Calibration:
    """Measure the threshold on copies of up to `songs` indexed songs (`embed(path) -> vector`)."""
    present = [i for i, p in enumerate(index.paths) if os.path.isfile(p)]
    if len(present) < 2:
        raise SearchError(f"{index.source}: calibration needs at least 2 indexed songs that are still on disk")
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(present, size=min(songs, len(present)), replace=False).tolist())
    centre = index.vectors.mean(axis=0)
    vectors = centred(index.vectors, centre)
    copies, per_variant = [], {}
    with tempfile.TemporaryDirectory(prefix="student-clap-calibrate-") as tmp:
        for n, i in enumerate(sample):
            folder = Path(tmp) / str(n)
            folder.mkdir()
            for variant, f in make_copies(index.paths[i], folder).items():
                s = float(np.dot(centred(embed(f), centre), vectors[i]))
                copies.append(s)
                per_variant[variant] = min(per_variant.get(variant, 1.0), s)
    neg_rows = np.array(present if len(present) <= NEGATIVE_SONGS else
                        sorted(rng.choice(present, size=NEGATIVE_SONGS, replace=False).tolist()))
    sims = vectors[neg_rows] @ vectors[neg_rows].T
    distinct = sims[np.triu_indices(len(neg_rows), k=1)]
    copies_a = np.array(copies)
    t = choose_threshold(copies_a, distinct)
    return Calibration(threshold=t, centre=[round(float(x), 7) for x in centre], false_positive_rate=float(np.mean(distinct >= t)) if len(distinct) else 0.0,
                       false_negative_rate=float(np.mean(copies_a < t)), n_songs=len(sample), n_copies=len(copies),
                       n_distinct_pairs=int(len(distinct)), copies_min=float(copies_a.min()),
                       distinct_max=float(distinct.max()) if len(distinct) else float("nan"), per_variant_min=per_variant)


def store_calibration(path: str | Path, cal: Calibration) -> None:
    """Write the threshold and its figures into the index's meta (taking the writer's lock)."""
    idx = read_index(path)
    with IndexWriter(path, audio_model=idx.audio_model, text_model=idx.text_model, dim=idx.dim,
                     model_identity=idx.model_identity) as writer:
        figures = {k: v for k, v in cal.__dict__.items() if k != "centre"}
        writer.set_meta({THRESHOLD_KEY: repr(cal.threshold), CENTRE_KEY: json.dumps(cal.centre),
                         CALIBRATION_KEY: json.dumps(figures)})
