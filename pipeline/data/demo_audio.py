"""Deterministic synthesiser for the embedded demo songs (released CC0 by this project).

Each track is generated music with known, audible attributes (lead instrument, drums, tempo, key)
over a soft bass and sometimes a quiet pad, the same for every instrument, so the lead is what tells
songs apart. `captions` and `tags` describe them; the demo teacher trains on other clips from the
same `render`. What the demo holds and why: docs/demo.md.
"""

from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

log = logging.getLogger(__name__)

INSTRUMENTS: tuple[str, ...] = ("piano", "guitar", "strings", "organ", "flute", "synthesizer", "brass", "bell")
TEMPI: dict[str, tuple[float, float]] = {"slow": (60.0, 80.0), "fast": (132.0, 160.0)}
MODES: tuple[str, ...] = ("major", "minor")

SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
}

# Chord progressions as scale degrees (0-based) of the chord roots.
PROGRESSIONS: tuple[tuple[int, ...], ...] = (
    (0, 4, 5, 3),
    (0, 5, 3, 4),
    (0, 3, 4, 4),
    (5, 3, 0, 4),
    (0, 0, 3, 4),
    (0, 3, 0, 4),
)

# Melody register (MIDI note of the tonic) per lead: each instrument plays where it usually sits.
_REGISTER: dict[str, tuple[int, int]] = {
    "piano": (60, 71), "guitar": (55, 64), "strings": (62, 72), "organ": (57, 67),
    "flute": (72, 81), "synthesizer": (60, 69), "brass": (55, 64), "bell": (72, 81),
}


@dataclass(frozen=True)
class Music:
    """What a clip sounds like: the attributes a caption or a tag can name."""

    lead: str  # one of INSTRUMENTS
    drums: bool
    tempo: str  # "slow" | "fast"
    mode: str  # "major" | "minor"

    def __post_init__(self) -> None:
        if self.lead not in INSTRUMENTS:
            raise ValueError(f"unknown lead instrument {self.lead!r}; choose from {INSTRUMENTS}")
        if self.tempo not in TEMPI:
            raise ValueError(f"tempo must be one of {tuple(TEMPI)}, got {self.tempo!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class Song:
    """One demo file: where and how it is encoded, who is credited, and what music it holds."""

    path: str  # relative to the output folder
    format: str  # soundfile format
    subtype: str  # soundfile subtype
    sample_rate: int
    channels: int
    seconds: float
    seed: int
    lead: str
    drums: bool
    tempo: str
    mode: str
    artist: str = ""
    title: str = ""
    level_db: float = -3.0  # peak level after mastering
    compression: float | None = None  # soundfile compression_level (lossy: 1 = lowest bitrate)
    bitrate_mode: str = "CONSTANT"  # mp3 only
    bits: int = 16  # effective resolution: fewer bits let a 16-bit FLAC shrink (wasted-bits coding)

    @property
    def music(self) -> Music:
        return Music(self.lead, self.drums, self.tempo, self.mode)


def _s(path, fmt, subtype, rate, ch, secs, seed, lead, drums, tempo, mode, artist, title, level=-3.0,
       compression=0.99, **kw) -> Song:
    return Song(path, fmt, subtype, rate, ch, secs, seed, lead, drums, tempo, mode, artist, title, level,
                compression, **kw)


_MP3 = ("MP3", "MPEG_LAYER_III")
_OGG = ("OGG", "VORBIS")

# Artists are chosen so that the artist-disjoint split (ingest.split_salt "student-clap",
# val_ratio 0.25) puts at least one song of every lead instrument in validation.
SONGS: tuple[Song, ...] = (
    # --- FMA (SONG/LINK/LICENSE LINK list format; Cash Song is NC and must be excluded by the licence policy)
    _s("fma/Morning_Walk.mp3", *_MP3, 44100, 2, 20.0, 101, "guitar", True, "fast", "major",
       "Lumen Quartet", "Morning Walk", -2.0),
    _s("fma/Evening_Rain.ogg", *_OGG, 22050, 1, 20.0, 102, "bell", False, "slow", "minor",
       "Lumen Quartet", "Evening Rain", -4.0),
    _s("fma/Iron_Steps.flac", "FLAC", "PCM_16", 22050, 1, 14.0, 103, "synthesizer", True, "fast", "minor",
       "Basalt", "Iron Steps", -8.0, 1.0, bits=10),
    _s("fma/Night_Engine.wav", "WAV", "PCM_16", 22050, 1, 11.0, 104, "organ", True, "fast", "minor",
       "Basalt", "Night Engine", -1.0, None),
    _s("fma/Low_Tide.mp3", *_MP3, 22050, 1, 24.0, 105, "flute", False, "slow", "major",
       "Tidal Choir", "Low Tide", -6.0, 0.95),
    _s("fma/Cash_Song.ogg", *_OGG, 22050, 1, 16.0, 106, "brass", True, "fast", "major",
       "Neon Parade", "Cash Song", -3.0),
    # --- Wikimedia Commons (markdown table; Lost_Recording.ogg is listed but has no file)
    _s("wikimedia/Prelude_in_D.opus", "OGG", "OPUS", 48000, 1, 20.0, 112, "piano", False, "slow", "major",
       "", "Prelude in D", -4.0, 0.97),
    _s("wikimedia/Harbour_Waltz.ogg", *_OGG, 44100, 2, 16.0, 113, "strings", False, "slow", "major",
       "", "Harbour Waltz", -3.0),
    _s("wikimedia/Village_Dance_1921.flac", "FLAC", "PCM_S8", 16000, 1, 12.0, 114, "brass", True, "fast", "major",
       "", "Village Dance 1921", -3.0, 1.0),
    _s("wikimedia/Clockwork_March.wav", "WAV", "PCM_16", 16000, 1, 11.0, 115, "bell", True, "fast", "major",
       "", "Clockwork March", -2.0, None),
    _s("wikimedia/Slow_Air_for_Strings.mp3", *_MP3, 48000, 1, 20.0, 116, "strings", False, "slow", "minor",
       "", "Slow Air for Strings", -4.0),
    _s("wikimedia/Rain_Study.ogg", *_OGG, 48000, 1, 16.0, 117, "piano", False, "slow", "minor",
       "", "Rain Study", -5.0),
) + tuple(
    # --- MTG-Jamendo (seed block list + autotagging TSV with the attributes as tags)
    _s(f"jamendo/{n % 100:02d}/{n}.mp3", *_MP3, rate, ch, secs, n, lead, drums, tempo, mode, artist, title,
       -3.0, 0.99, bitrate_mode=brm)
    for n, lead, drums, tempo, mode, artist, title, rate, ch, secs, brm in (
        (1001, "piano", True, "slow", "minor", "Kettle Lane", "Sunday Dub", 44100, 2, 20.0, "CONSTANT"),
        (1002, "organ", True, "fast", "major", "Kettle Lane", "Copper Sky", 48000, 1, 18.0, "VARIABLE"),
        (1003, "flute", False, "slow", "minor", "Copper Lights", "Glass Harbour", 48000, 2, 18.0, "CONSTANT"),
        (1004, "synthesizer", True, "fast", "minor", "Copper Lights", "Paper Lanterns", 22050, 1, 20.0, "CONSTANT"),
        (1005, "brass", False, "slow", "major", "Willow Fields", "Dust Road", 44100, 2, 18.0, "CONSTANT"),
        (1007, "guitar", False, "slow", "minor", "Willow Fields", "Quiet Orchard", 22050, 1, 18.0, "CONSTANT"),
        (1008, "piano", False, "fast", "major", "Mira Okafor", "Tin Roof", 22050, 1, 18.0, "CONSTANT"),
        (1009, "piano", True, "fast", "minor", "Kettle Sky", "Night Bus", 22050, 1, 16.0, "CONSTANT"),
        (1010, "organ", False, "slow", "minor", "Mira Okafor", "Chapel Steps", 22050, 1, 18.0, "CONSTANT"),
        (1011, "organ", True, "slow", "major", "Static Lane", "Sunday Best", 22050, 1, 16.0, "CONSTANT"),
        (1012, "flute", True, "fast", "major", "Kettle Sky", "Meadow Run", 22050, 1, 16.0, "CONSTANT"),
        (1013, "flute", False, "fast", "minor", "Static Lane", "Reed Smoke", 22050, 1, 18.0, "CONSTANT"),
        (1014, "synthesizer", False, "slow", "major", "Mira Fields", "Neon Dawn", 22050, 1, 18.0, "CONSTANT"),
        (1015, "synthesizer", True, "slow", "minor", "Kettle Coast", "Grid Lines", 44100, 1, 16.0, "CONSTANT"),
        (1016, "brass", True, "fast", "minor", "Mira Fields", "Red Signal", 22050, 1, 16.0, "CONSTANT"),
        (1017, "brass", True, "slow", "major", "Kettle Coast", "Old Parade", 22050, 1, 18.0, "CONSTANT"),
        (1018, "guitar", True, "fast", "major", "Static Okafor", "Dirt Track", 22050, 1, 16.0, "CONSTANT"),
        (1019, "guitar", False, "fast", "major", "Mira Lights", "Porch Light", 44100, 1, 18.0, "CONSTANT"),
        (1020, "strings", True, "fast", "minor", "Static Okafor", "Storm Front", 22050, 1, 16.0, "CONSTANT"),
        (1021, "strings", False, "slow", "major", "Mira Lights", "Long Letter", 22050, 1, 18.0, "CONSTANT"),
        (1022, "strings", True, "slow", "minor", "Kettle Works", "Grey Harbour", 22050, 1, 16.0, "CONSTANT"),
        (1023, "bell", False, "fast", "minor", "Kettle Works", "Ice Crystals", 22050, 1, 16.0, "CONSTANT"),
        (1024, "bell", True, "slow", "major", "Static Sky", "Music Box", 22050, 1, 16.0, "CONSTANT"),
        (1025, "bell", False, "slow", "minor", "Static Sky", "Lighthouse", 44100, 1, 18.0, "CONSTANT"),
    )
)

CORRUPT_FILES: dict[str, bytes] = {
    # What a failed download typically leaves behind: an HTML error page under an audio name.
    "jamendo/06/1006.mp3": (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><p>The requested track is not available.</p></body></html>\n"
    )
    * 8,
}


# --------------------------------------------------------------------------- words for the attributes

INSTRUMENT_WORDS: dict[str, tuple[str, ...]] = {
    "piano": ("piano", "grand piano", "piano", "keys"),
    "guitar": ("guitar", "acoustic guitar", "plucked guitar", "guitar"),
    "strings": ("strings", "string section", "violins", "bowed strings"),
    "organ": ("organ", "hammond organ", "organ", "electric organ"),
    "flute": ("flute", "flute", "wooden flute"),
    "synthesizer": ("synthesizer", "synth", "synth lead", "analog synth"),
    "brass": ("brass", "horns", "trumpet", "brass section"),
    "bell": ("bells", "chimes", "bell", "glockenspiel"),
}
TEMPO_WORDS = {"slow": ("slow", "calm", "slow-paced", "gentle", "relaxed"),
               "fast": ("fast", "upbeat", "energetic", "fast-paced", "lively")}
MODE_WORDS = {"major": ("happy", "bright", "cheerful"), "minor": ("sad", "melancholic", "dark")}
MODE_KEY = {"major": ("in a major key", "in major"), "minor": ("in a minor key", "in minor")}
DRUM_WORDS = {True: ("with drums", "with a drum beat", "with drums and percussion", "with a steady beat"),
              False: ("without drums", "with no drums", "without percussion", "with no beat")}
NOUNS = ("song", "track", "piece", "tune", "music", "melody")



def query_terms() -> dict[str, list[str]]:
    """The demo's query-term categories (`text_queries.terms` of the demo profile): the words its
    captions use for each attribute, in the Title Case of the real term lists. The demo teacher knows
    these words and no others, so the text student learns from targets that mean something."""
    title = lambda words: sorted({" ".join(w.capitalize() for w in t.split()) for t in words})  # noqa: E731
    return {
        "Instrument": title(w for ws in INSTRUMENT_WORDS.values() for w in ws),
        "Drums": title(["drums", "no drums", "percussion", "drum beat", "steady beat", "no beat"]),
        "Tempo": title(w for ws in TEMPO_WORDS.values() for w in ws),
        "Mood": title(w for ws in MODE_WORDS.values() for w in ws),
    }

def caption(music: Music, rng: np.random.Generator) -> tuple[str, dict[str, object]]:
    """A varied description naming a random non-empty subset of the attributes.

    Returns the text and the attributes it names ({"lead": "piano", "drums": True, ...}); a clip
    fits a caption when it has every attribute the caption names.
    """
    while True:
        named = {k: v for k, v, p in (("lead", music.lead, 0.75), ("drums", music.drums, 0.5),
                                      ("tempo", music.tempo, 0.5), ("mode", music.mode, 0.4))
                 if rng.random() < p}
        if named:
            break
    pick = lambda words: str(words[int(rng.integers(len(words)))])
    inst = pick(INSTRUMENT_WORDS[music.lead]) if "lead" in named else None
    drums = pick(DRUM_WORDS[music.drums]) if "drums" in named else None
    adjs = [pick(TEMPO_WORDS[music.tempo])] if "tempo" in named else []
    key = None
    if "mode" in named:
        if rng.random() < 0.5:
            adjs.append(pick(MODE_WORDS[music.mode]))
        else:
            key = pick(MODE_KEY[music.mode])
    if rng.random() < 0.5:
        adjs.reverse()
    noun = pick(NOUNS)
    style = rng.random()
    if inst and not adjs and not drums and not key and style < 0.4:
        text = inst  # a bare search word, as users type it
    elif drums and not inst and not adjs and not key and style < 0.3:
        text = "drums" if music.drums else "no drums"
    elif inst and style < 0.55:
        text = " ".join(adjs + [inst, noun] + ([key] if key else []) + ([drums] if drums else []))
    elif style < 0.8:
        head = " ".join(adjs + [noun]) if adjs else noun
        tail = [f"with {inst}"] if inst else []
        tail += [key] if key else []
        tail += [drums] if drums else []
        text = f"This is a {head}" + (" " + " ".join(tail) if tail else "") + "."
    else:
        text = " ".join(adjs + ([inst] if inst else []) + [noun] + ([key] if key else []) + ([drums] if drums else []))
        text = ("a " if rng.random() < 0.5 else "an instrumental ") + text
    return " ".join(text.split()), named


def fits(music: Music, named: dict[str, object]) -> bool:
    """Whether a clip with these attributes fits a caption that names `named`."""
    return all(getattr(music, k) == v for k, v in named.items())


def tags(music: Music) -> list[str]:
    """MTG-Jamendo style tags: the lead (and drums) as instruments, tempo and key feel as mood/theme."""
    out = [f"instrument---{music.lead}"]
    if music.drums:
        out.append("instrument---drums")
    out.append(f"mood/theme---{music.tempo}")
    out.append("mood/theme---" + ("happy" if music.mode == "major" else "sad"))
    return out


# --------------------------------------------------------------------------- instruments


def _midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69.0) / 12.0)


def _envelope(n: int, sr: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    """ADSR over n samples; the release occupies the end of the note."""
    t = np.arange(n) / sr
    env = np.where(t < attack, t / max(attack, 1e-4), 1.0)
    dec = np.exp(-np.maximum(t - attack, 0.0) / max(decay, 1e-4))
    env = env * (sustain + (1.0 - sustain) * dec)
    rel_n = min(n, int(release * sr))
    if rel_n > 0:
        env[n - rel_n :] *= np.linspace(1.0, 0.0, rel_n)
    return env


def _partials(phase: np.ndarray, amps: list[tuple[float, float]], freq: float, sr: int,
              rng: np.random.Generator) -> np.ndarray:
    """Sum of sines at multiples `k` of a running phase with amplitudes `a`, skipping aliasing ones."""
    out = np.zeros_like(phase)
    for k, a in amps:
        if freq * k >= sr * 0.45:
            break
        out += a * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return out


def _karplus_strong(freq: float, n: int, sr: int, rng: np.random.Generator, damping: float) -> np.ndarray:
    """Plucked string: a noise burst circulating through an averaging delay line, one period per step."""
    period = max(2, int(round(sr / freq)))
    out = np.empty(n + period + 1)
    out[: period + 1] = rng.uniform(-1, 1, period + 1)
    pos = period + 1
    while pos < len(out):
        end = min(pos + period, len(out))
        prev = out[pos - period - 1 : end - period - 1 + 1]
        # y[i] = damping * (y[i - P] + y[i - P - 1]) / 2, computed a period at a time
        out[pos:end] = damping * 0.5 * (prev[1:] + prev[:-1])[: end - pos]
        pos = end
    return out[period + 1 : period + 1 + n]


def _lowpass(x: np.ndarray, alpha: float) -> np.ndarray:
    """One-pole low-pass (y += alpha * (x - y)), vectorised through an exponential filter."""
    from scipy.signal import lfilter

    return lfilter([alpha], [1.0, alpha - 1.0], x)


def _render_note(kind: str, freq: float, dur: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = max(1, int(dur * sr))
    t = np.arange(n) / sr
    if kind == "piano":
        # stiff-string partials (slightly sharp), higher ones dying faster; a hammer click on top
        out = np.zeros(n)
        for k in range(1, 13):
            f = freq * k * np.sqrt(1.0 + 0.0004 * k * k)
            if f >= sr * 0.45:
                break
            out += np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t * (0.7 + 0.9 * k)) / k**1.1
        click = _lowpass(rng.uniform(-1, 1, n), 0.3) * np.exp(-t / 0.004) * 0.3
        return (out + click) * _envelope(n, sr, 0.002, 10.0, 1.0, 0.03)
    if kind == "guitar":
        return _karplus_strong(freq, n, sr, rng, 0.995) * _envelope(n, sr, 0.001, 10.0, 1.0, 0.02)
    if kind == "strings":
        vib = 1.0 + 0.006 * np.sin(2 * np.pi * 5.5 * t + rng.uniform(0, 6.28))
        phase = 2 * np.pi * np.cumsum(freq * vib) / sr
        tone = _partials(phase, [(k, 1.0 / k**1.1) for k in range(1, 14)], freq, sr, rng)
        bow = _lowpass(rng.uniform(-1, 1, n), 0.2) * 0.08
        return (tone + bow) * _envelope(n, sr, min(0.25, dur * 0.4), 1.0, 0.85, min(0.2, dur * 0.3)) * 0.6
    if kind == "organ":
        phase = 2 * np.pi * freq * t
        drawbars = [(1, 1.0), (2, 0.8), (3, 0.6), (4, 0.5), (6, 0.35), (8, 0.3), (10, 0.15)]
        tone = _partials(phase, drawbars, freq, sr, rng) * (1.0 + 0.15 * np.sin(2 * np.pi * 6.5 * t))
        return tone * _envelope(n, sr, 0.008, 1.0, 1.0, 0.02) * 0.45
    if kind == "flute":
        vib = 1.0 + 0.005 * np.sin(2 * np.pi * 5.0 * t)
        phase = 2 * np.pi * np.cumsum(freq * vib) / sr
        tone = _partials(phase, [(1, 1.0), (2, 0.22), (3, 0.07)], freq, sr, rng)
        breath = _lowpass(rng.uniform(-1, 1, n), 0.15) * 0.18
        return (tone + breath) * _envelope(n, sr, min(0.08, dur * 0.3), 1.0, 0.9, 0.05)
    if kind == "synthesizer":
        tone = np.zeros(n)
        for det in (-0.006, 0.006):
            phase = 2 * np.pi * freq * (1 + det) * t
            tone += _partials(phase, [(k, 1.0 / k) for k in range(1, 40)], freq, sr, rng)
        return tone * _envelope(n, sr, 0.005, 0.2, 0.8, 0.02) * 0.3
    if kind == "brass":
        env = _envelope(n, sr, min(0.07, dur * 0.3), 0.3, 0.8, 0.04)
        phase = 2 * np.pi * freq * t
        out = np.zeros(n)
        for k in range(1, 20):
            if freq * k >= sr * 0.45:
                break
            # brighter as the note swells: high partials follow a steeper power of the envelope
            out += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) * env ** (1.0 + 0.3 * (k - 1)) / k**0.8
        return out * 0.35
    if kind == "bell":
        idx = 4.0 * np.exp(-t / 0.5)
        tone = np.sin(2 * np.pi * freq * t + idx * np.sin(2 * np.pi * freq * 3.5 * t))
        return tone * _envelope(n, sr, 0.002, 0.8, 0.0, 0.02)
    if kind == "bass":
        return (np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(4 * np.pi * freq * t)) * _envelope(n, sr, 0.01, 0.4, 0.6, 0.05)
    if kind == "pad":
        phase = 2 * np.pi * freq * t
        return _partials(phase, [(1, 1.0), (2, 0.2)], freq, sr, rng) * _envelope(n, sr, 0.3, 1.0, 1.0, 0.3)
    raise ValueError(f"unknown instrument {kind!r}")


def _drum(kind: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "kick":
        n = int(0.35 * sr)
        t = np.arange(n) / sr
        f = 45.0 + 110.0 * np.exp(-t / 0.03)
        return np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / 0.12)
    if kind == "snare":
        n = int(0.22 * sr)
        t = np.arange(n) / sr
        noise = rng.uniform(-1, 1, n)
        noise = noise - np.concatenate([[0.0], noise[:-1]]) * 0.6  # tilt toward highs
        return 0.7 * noise * np.exp(-t / 0.06) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.05)
    if kind == "hat":
        n = int(0.06 * sr)
        t = np.arange(n) / sr
        noise = rng.uniform(-1, 1, n)
        noise = np.diff(noise, prepend=0.0)  # first difference: a crude high-pass
        return 0.35 * noise * np.exp(-t / 0.015)
    raise ValueError(f"unknown drum {kind!r}")


# pattern: list of (instrument, position in beats within a 4-beat bar)
_DRUM_PATTERNS: dict[str, tuple[list[tuple[str, float]], ...]] = {
    "fast": (
        [("kick", 0), ("kick", 2), ("kick", 2.5), ("snare", 1), ("snare", 3)] + [("hat", i * 0.5) for i in range(8)],
        [("kick", float(i)) for i in range(4)] + [("snare", 1), ("snare", 3)] + [("hat", i + 0.5) for i in range(4)],
    ),
    "slow": (
        [("kick", 0), ("snare", 2)] + [("hat", float(i)) for i in range(4)],
        [("kick", 0), ("kick", 2.5), ("snare", 1), ("snare", 3)] + [("hat", i * 0.5) for i in range(8)],
    ),
}


# --------------------------------------------------------------------------- composition


def _place(buf: np.ndarray, sig: np.ndarray, start: int, gain: float, pan: float) -> None:
    """Mix `sig` into the stereo buffer at `start` with constant-power panning (pan in [-1, 1])."""
    end = min(buf.shape[1], start + len(sig))
    if end <= start:
        return
    angle = (pan + 1.0) * np.pi / 4.0
    buf[0, start:end] += gain * np.cos(angle) * sig[: end - start]
    buf[1, start:end] += gain * np.sin(angle) * sig[: end - start]


def render(music: Music, seconds: float, sample_rate: int, seed: int, *, channels: int = 2,
           level_db: float = -3.0, fade_seconds: float = 1.5) -> np.ndarray:
    """Render music with these attributes as float64 [channels, samples] peaking at level_db dBFS.

    The seed picks everything the attributes leave open: exact tempo, key, progression, melody,
    drum pattern, whether a pad plays, panning."""
    sr = sample_rate
    rng = np.random.default_rng(seed)
    n_total = int(seconds * sr)
    buf = np.zeros((2, n_total + sr))  # one second of slack for ringing notes
    lo, hi = TEMPI[music.tempo]
    beat = 60.0 / float(rng.uniform(lo, hi))
    bar = 4 * beat
    scale = SCALES[music.mode]
    progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    root = int(rng.integers(_REGISTER[music.lead][0], _REGISTER[music.lead][1] + 1))
    notes_per_beat = 1 if music.tempo == "slow" else 2
    pad = rng.random() < 0.5
    pattern = _DRUM_PATTERNS[music.tempo][int(rng.integers(2))]
    lead_pan = float(rng.uniform(-0.3, 0.3))
    n_bars = int(np.ceil(seconds / bar))
    offset = float(rng.uniform(0, bar))  # clips start anywhere in a bar

    def degree_note(degree: int, octave_shift: int = 0) -> int:
        octave, step = divmod(degree, len(scale))
        return root + scale[step] + 12 * (octave + octave_shift)

    melody_degree = 0
    for b in range(n_bars + 1):
        bar_start = b * bar - offset
        chord_root = progression[b % len(progression)]
        chord = [chord_root, chord_root + 2, chord_root + 4]
        if pad:
            for i, d in enumerate(chord):
                sig = _render_note("pad", _midi_hz(degree_note(d, -1)), bar * 0.98, sr, rng)
                _place(buf, sig, max(0, int(bar_start * sr)), 0.05, -0.4 + 0.4 * i)
        for k in range(4):
            if k % 2 == 1 and rng.random() < 0.5:
                continue
            step = chord_root + (4 if k == 3 and rng.random() < 0.4 else 0)
            sig = _render_note("bass", _midi_hz(degree_note(step, -2)), beat * 0.9, sr, rng)
            start = bar_start + k * beat
            if start >= 0:
                _place(buf, sig, int(start * sr), 0.22, 0.0)
        grid = beat / notes_per_beat
        for k in range(4 * notes_per_beat):
            if rng.random() < 0.15:  # a rest
                continue
            # random walk, pulled toward chord tones on strong beats
            melody_degree += int(rng.choice([-2, -1, -1, 0, 1, 1, 2]))
            melody_degree = int(np.clip(melody_degree, -2, len(scale) + 4))
            if k % notes_per_beat == 0 and rng.random() < 0.5:
                melody_degree = chord[int(rng.integers(3))]
            length = grid * (2 if rng.random() < 0.25 else 1)
            start = bar_start + k * grid
            if start < 0:
                continue
            sig = _render_note(music.lead, _midi_hz(degree_note(melody_degree)), length * 0.95, sr, rng)
            _place(buf, sig, int(start * sr), 0.35, lead_pan)
        if music.drums:
            for name, pos in pattern:
                start = bar_start + pos * beat
                if start < 0:
                    continue
                gain = {"kick": 0.6, "snare": 0.35, "hat": 0.22}[name]
                pan = {"kick": 0.0, "snare": 0.1, "hat": -0.3}[name]
                _place(buf, _drum(name, sr, rng), int(start * sr), gain, pan)

    out = buf[:, :n_total]
    fade = min(n_total // 4, int(fade_seconds * sr))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        out[:, :fade] *= ramp
        out[:, n_total - fade :] *= ramp[::-1]
    if channels == 1:
        out = out.mean(axis=0, keepdims=True)
    peak = float(np.max(np.abs(out))) or 1.0
    return out * (10.0 ** (level_db / 20.0) / peak)


def synthesize(song: Song) -> np.ndarray:
    """Render `song` as float64 [channels, samples] peaking at song.level_db dBFS."""
    return render(song.music, song.seconds, song.sample_rate, song.seed, channels=song.channels,
                  level_db=song.level_db)


# --------------------------------------------------------------------------- writing


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def fix_ogg_serial(path: Path, serial: int) -> None:
    """Give every Ogg page a fixed stream serial number (and a fresh page CRC).

    libsndfile picks a random serial for each new Ogg stream, which is the only thing that keeps
    its Vorbis/Opus output from being byte-for-byte reproducible.
    """
    data = bytearray(Path(path).read_bytes())
    pos = 0
    while pos < len(data):
        if data[pos : pos + 4] != b"OggS":
            raise ValueError(f"{path}: no Ogg page at byte {pos}")
        n_seg = data[pos + 26]
        size = 27 + n_seg + sum(data[pos + 27 : pos + 27 + n_seg])
        data[pos + 14 : pos + 18] = serial.to_bytes(4, "little")
        data[pos + 22 : pos + 26] = b"\0\0\0\0"
        crc = 0
        for byte in data[pos : pos + size]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
        data[pos + 22 : pos + 26] = crc.to_bytes(4, "little")
        pos += size
    Path(path).write_bytes(bytes(data))


def write_song(song: Song, out_dir: Path) -> Path:
    wave = synthesize(song).T  # soundfile wants [samples, channels]
    if song.bits < 16:
        step = 2.0 ** (1 - song.bits)
        wave = np.round(wave / step) * step
    return write_wave(song, wave.astype(np.float32), out_dir)


def write_wave(song: Song, wave: np.ndarray, out_dir: Path) -> Path:
    """Encode wave [samples, channels] at out_dir/song.path in the song's format, rate and codec settings."""
    path = out_dir / song.path
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if song.compression is not None:
        kwargs["compression_level"] = song.compression
    if song.format == "MP3":
        kwargs["bitrate_mode"] = song.bitrate_mode
    # Written in blocks: libsndfile's MP3 encoder crashes on one very large write (minutes of audio).
    with sf.SoundFile(path, "w", song.sample_rate, wave.shape[1], subtype=song.subtype, format=song.format,
                      **kwargs) as f:
        for pos in range(0, len(wave), 1 << 16):
            f.write(wave[pos : pos + (1 << 16)])
    if song.format == "OGG":
        fix_ogg_serial(path, song.seed)
    return path


def synthesize_all(out_dir: Path) -> list[Path]:
    """Write every demo file (and the corrupt one) under out_dir; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    for song in tqdm(SONGS, desc="demo songs", unit="song"):
        written.append(write_song(song, out_dir))
        log.info("wrote %s (%.0f s, %d Hz, %d ch)", written[-1], song.seconds, song.sample_rate, song.channels)
    for rel, data in CORRUPT_FILES.items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
        log.info("wrote %s (deliberately not audio)", path)
    total = sum(p.stat().st_size for p in written)
    log.info("%d files, %.2f MB in %s", len(written), total / 1e6, out_dir)
    return written


# --------------------------------------------------------------------------- benchmark corpora

# Corpus songs take seeds at and above this; the demo songs (101-1025) and the demo teacher's
# training and held-out clips (pipeline.teacher.demo: 1000 + i, and 10^10 + 1000 + i) stay below
# or far above it, so a benchmark never scores the teacher or the student on a clip it trained on.
CORPUS_SEED_BASE = 50_000_000
CORPUS_TRACK_BASE = 500_000  # MTG-Jamendo style track numbers of corpus songs

# (extension, soundfile format, subtype, sample rate, channels, compression): every demo format
CORPUS_FORMATS: tuple[tuple[str, str, str, int, int, float | None], ...] = (
    ("mp3", *_MP3, 44100, 2, 0.99),
    ("mp3", *_MP3, 22050, 1, 0.99),
    ("ogg", *_OGG, 22050, 1, 0.99),
    ("opus", "OGG", "OPUS", 48000, 1, 0.97),
    ("flac", "FLAC", "PCM_16", 22050, 1, 1.0),
    ("wav", "WAV", "PCM_16", 16000, 1, None),
)


def corpus_songs(n: int, seed: int = 0, min_seconds: float = 15.0, max_seconds: float = 30.0,
                 max_per_artist: int = 5) -> list[Song]:
    """`n` labelled songs for the fidelity benchmark, every attribute combination equally often.

    Songs are grouped under artists of 1..max_per_artist songs (the split is by artist), take the
    demo formats in turn at random, and last uniform(min_seconds, max_seconds). Deterministic in
    (n, seed); the first songs of a larger corpus are the songs of a smaller one with the same seed."""
    if n < 1 or not 0 < min_seconds <= max_seconds or max_per_artist < 1:
        raise ValueError(f"corpus: need n >= 1, 0 < min_seconds <= max_seconds, max_per_artist >= 1; "
                         f"got n={n}, seconds {min_seconds}..{max_seconds}, max_per_artist={max_per_artist}")
    combos = [Music(lead, drums, tempo, mode) for lead in INSTRUMENTS for drums in (False, True)
              for tempo in TEMPI for mode in MODES]
    songs: list[Song] = []
    artist, left = "", 0
    for i in range(n):
        rng = np.random.default_rng([seed, i])  # per song: a prefix of the corpus never changes
        block, slot = divmod(i, len(combos))
        music = combos[np.random.default_rng([seed, block]).permutation(len(combos))[slot]]
        if left == 0:
            artist, left = f"Corpus Artist {seed}-{i:05d}", int(rng.integers(1, max_per_artist + 1))
        left -= 1
        ext, fmt, subtype, rate, channels, compression = CORPUS_FORMATS[int(rng.integers(len(CORPUS_FORMATS)))]
        number = CORPUS_TRACK_BASE + i
        songs.append(Song(f"{number % 100:02d}/{number}.{ext}", fmt, subtype, rate, channels,
                          round(float(rng.uniform(min_seconds, max_seconds)), 2), CORPUS_SEED_BASE + seed * 1_000_000 + i,
                          music.lead, music.drums, music.tempo, music.mode, artist, f"Study {i}",
                          round(float(rng.uniform(-8.0, -1.0)), 2), compression))
    return songs


def _write_corpus_song(song: Song, audio_dir: Path) -> str:
    """Write one song through a temporary name, so a killed run never leaves a truncated file."""
    final = audio_dir / song.path
    if final.is_file():
        return song.path
    part = replace(song, path=song.path + ".part")
    write_song(part, audio_dir)
    os.replace(audio_dir / part.path, final)
    return song.path


def write_corpus(songs: list[Song], out_dir: Path, jobs: int = 1) -> dict[str, Path]:
    """Audio under out_dir/audio/jamendo and its MTG-Jamendo style list and autotagging TSV under
    out_dir/sources/jamendo (CC BY 4.0: the licence policy admits it). Songs already written are
    kept, so an interrupted run resumes. Returns the paths ingest params name."""
    audio_dir = Path(out_dir) / "audio" / "jamendo"
    lists_dir = Path(out_dir) / "sources" / "jamendo"
    for d in (audio_dir, lists_dir, Path(out_dir) / "audio" / "empty"):
        d.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_write_corpus_song, s, audio_dir) for s in songs]
        for f in tqdm(as_completed(futures), total=len(futures), desc="corpus songs", unit="song"):
            f.result()
    blocks = ["## Training Dataset Songs - MTG JAMENDO", "Synthesised benchmark songs (pipeline.data.demo_audio).",
              "Below the list of the specific songs used and their license.", ""]
    rows = ["TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"]
    artists: dict[str, int] = {}
    for s in songs:
        number = int(Path(s.path).stem)
        blocks += [s.path, f"{s.title} by {s.artist} from Jamendo: http://www.jamendo.com/track/{number}",
                   "Available under a Creative Commons Attribution license: http://creativecommons.org/licenses/by/4.0/", ""]
        a = artists.setdefault(s.artist, len(artists) + 1)
        rows.append("\t".join([f"track_{number:07d}", f"artist_{a:06d}", f"album_{a:06d}", s.path,
                               f"{s.seconds:.1f}", *tags(s.music)]))
    licence_list = lists_dir / "MTG_JAMENDO_SONGS_LICENSE.md"
    metadata = lists_dir / "autotagging.tsv"
    licence_list.write_text("\n".join(blocks), encoding="utf-8")
    metadata.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {"audio_root": audio_dir, "list": licence_list, "metadata": metadata,
            "empty_root": Path(out_dir) / "audio" / "empty"}


def corpus_main(args: argparse.Namespace) -> int:
    songs = corpus_songs(args.songs, args.seed, args.min_seconds, args.max_seconds)
    paths = write_corpus(songs, Path(args.out), jobs=args.jobs)
    log.info("%d corpus songs (%.1f audio-minutes) under %s; list %s", len(songs),
             sum(s.seconds for s in songs) / 60, paths["audio_root"], paths["list"])
    return 0


def main(args: argparse.Namespace) -> int:
    synthesize_all(Path(args.out))
    return 0
