"""Deterministic synthesiser for the embedded demo songs (released CC0 by this project).

Every demo track is a small piece of generated music: a chord progression on a pad, a bass line,
a melody and (for some) a drum kit, each with its own tempo, metre, key, scale and instrument
timbres (additive, FM, plucked string, band-limited saw, strings), so the tracks differ audibly
and spectrally. The files are written in the formats, rates and channel counts that the demo song
lists promise (mp3, Ogg Vorbis, Opus, FLAC, WAV; mono and stereo; 22.05/44.1/48 kHz), plus one
corrupt file (an HTML error page saved with an .mp3 name). The listed-but-missing entry gets no
file on purpose.

`student-clap demo synth --out data/demo/audio` regenerates everything from the seeds below.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

log = logging.getLogger(__name__)

SCALES: dict[str, tuple[int, ...]] = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "harmonic_minor": (0, 2, 3, 5, 7, 8, 11),
    "pentatonic": (0, 2, 4, 7, 9),
    "minor_pentatonic": (0, 3, 5, 7, 10),
}

# Chord progressions as scale degrees (0-based) of the chord roots.
PROGRESSIONS: tuple[tuple[int, ...], ...] = (
    (0, 4, 5, 3),
    (0, 5, 3, 4),
    (0, 3, 4, 4),
    (5, 3, 0, 4),
    (0, 0, 3, 4),
    (0, 6, 5, 4),
)


@dataclass(frozen=True)
class Song:
    """One demo file: where and how it is encoded, and what music it holds."""

    path: str  # relative to the output folder
    format: str  # soundfile format
    subtype: str  # soundfile subtype
    sample_rate: int
    channels: int
    seconds: float
    seed: int
    tempo: float  # beats per minute
    beats_per_bar: int
    root: int  # MIDI note of the key's tonic (melody octave)
    scale: str
    lead: str  # instrument names, see _INSTRUMENTS
    pad: str | None
    bass: str | None
    drums: str | None  # pattern name, see _DRUM_PATTERNS
    level_db: float = -3.0  # peak level after mastering
    notes_per_beat: int = 2  # melody rhythm grid
    compression: float | None = None  # soundfile compression_level (lossy: 1 = lowest bitrate)
    bitrate_mode: str = "CONSTANT"  # mp3 only
    bits: int = 16  # effective resolution: fewer bits let a 16-bit FLAC shrink (wasted-bits coding)


SONGS: tuple[Song, ...] = (
    # path, format, subtype, rate, channels, seconds, seed, tempo, metre, root, scale,
    # lead, pad, bass, drums, level dB, melody notes per beat, compression, ...
    Song("fma/Morning_Walk.mp3", "MP3", "MPEG_LAYER_III", 44100, 2, 24.0, 101, 104, 4, 67, "major",
         "pluck", "additive", "sine_bass", "rock", -2.0, 2, 0.99),
    Song("fma/Evening_Rain.ogg", "OGG", "VORBIS", 22050, 1, 30.0, 102, 68, 4, 69, "minor",
         "fm_bell", "strings", "sine_bass", None, -4.0, 1, 0.99),
    Song("fma/Iron_Steps.flac", "FLAC", "PCM_16", 22050, 1, 20.0, 103, 128, 4, 57, "harmonic_minor",
         "saw", None, "fm_bass", "four", -8.0, 4, 1.0, bits=12),
    Song("fma/Night_Engine.wav", "WAV", "PCM_16", 22050, 1, 20.0, 104, 120, 4, 64, "dorian",
         "saw", "strings", "fm_bass", "four", -1.0, 2),
    Song("fma/Low_Tide.mp3", "MP3", "MPEG_LAYER_III", 22050, 1, 60.0, 105, 62, 4, 62, "pentatonic",
         "additive", "strings", None, None, -6.0, 1, 0.95),
    Song("fma/Cash_Song.ogg", "OGG", "VORBIS", 22050, 1, 20.0, 106, 112, 4, 72, "major",
         "fm_epiano", "additive", "sine_bass", "rock", -3.0, 2, 0.99),
    Song("jamendo/01/1001.mp3", "MP3", "MPEG_LAYER_III", 44100, 2, 26.0, 107, 76, 4, 62, "minor",
         "fm_epiano", None, "sine_bass", "dub", -3.0, 2, 0.99),
    Song("jamendo/02/1002.mp3", "MP3", "MPEG_LAYER_III", 48000, 1, 21.0, 108, 142, 4, 64, "mixolydian",
         "saw", "additive", "fm_bass", "rock", -2.0, 2, 0.99, bitrate_mode="VARIABLE"),
    Song("jamendo/03/1003.mp3", "MP3", "MPEG_LAYER_III", 48000, 2, 23.0, 109, 90, 4, 76, "major",
         "fm_bell", "strings", None, None, -5.0, 2, 0.99),
    Song("jamendo/04/1004.mp3", "MP3", "MPEG_LAYER_III", 22050, 1, 35.0, 110, 84, 4, 69, "minor_pentatonic",
         "pluck", None, "sine_bass", None, -3.0, 2, 0.95),
    Song("jamendo/05/1005.mp3", "MP3", "MPEG_LAYER_III", 44100, 2, 20.0, 111, 96, 4, 57, "minor_pentatonic",
         "saw", "strings", "pluck_bass", "march", -4.0, 1, 0.99),
    Song("wikimedia/Prelude_in_D.opus", "OGG", "OPUS", 48000, 1, 42.0, 112, 66, 4, 74, "major",
         "additive", None, "additive_bass", None, -4.0, 4, 0.97),
    Song("wikimedia/Harbour_Waltz.ogg", "OGG", "VORBIS", 44100, 2, 22.0, 113, 156, 3, 65, "major",
         "additive", "strings", "sine_bass", "waltz", -3.0, 1, 0.99),
    Song("wikimedia/Village_Dance_1921.flac", "FLAC", "PCM_S8", 22050, 2, 20.0, 114, 132, 3, 69, "dorian",
         "pluck", None, "pluck_bass", "waltz", -3.0, 2, 1.0),
    Song("wikimedia/Clockwork_March.wav", "WAV", "PCM_16", 22050, 2, 20.0, 115, 112, 4, 60, "major",
         "fm_bell", None, "fm_bass", "march", -2.0, 2),
    Song("wikimedia/Slow_Air_for_Strings.mp3", "MP3", "MPEG_LAYER_III", 48000, 1, 32.0, 116, 58, 4, 67, "minor",
         "strings", "strings", "sine_bass", None, -4.0, 1, 0.99),
    Song("wikimedia/Rain_Study.ogg", "OGG", "VORBIS", 48000, 1, 20.0, 117, 72, 4, 71, "harmonic_minor",
         "fm_epiano", "additive", None, None, -5.0, 2, 0.99),
)

CORRUPT_FILES: dict[str, bytes] = {
    # What a failed download typically leaves behind: an HTML error page under an audio name.
    "jamendo/06/1006.mp3": (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><p>The requested track is not available.</p></body></html>\n"
    )
    * 8,
}


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


def _additive(freq: float, n: int, sr: int, rng: np.random.Generator, *, tilt: float, n_harm: int,
              odd_only: bool = False, detune: float = 0.0) -> np.ndarray:
    t = np.arange(n) / sr
    out = np.zeros(n)
    for k in range(1, n_harm + 1):
        if odd_only and k % 2 == 0:
            continue
        f = freq * k * (1.0 + detune * rng.uniform(-1, 1))
        if f >= sr * 0.45:
            break
        out += np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) / k**tilt
    return out


def _fm(freq: float, n: int, sr: int, *, ratio: float, index: float, index_decay: float) -> np.ndarray:
    t = np.arange(n) / sr
    idx = index * np.exp(-t / index_decay)
    return np.sin(2 * np.pi * freq * t + idx * np.sin(2 * np.pi * freq * ratio * t))


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


def _render_note(kind: str, freq: float, dur: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = max(1, int(dur * sr))
    if kind == "additive":
        return _additive(freq, n, sr, rng, tilt=1.6, n_harm=10) * _envelope(n, sr, 0.005, 0.35, 0.25, 0.05)
    if kind == "additive_bass":
        return _additive(freq, n, sr, rng, tilt=1.2, n_harm=6) * _envelope(n, sr, 0.01, 0.5, 0.4, 0.05)
    if kind == "saw":
        return _additive(freq, n, sr, rng, tilt=1.0, n_harm=24) * _envelope(n, sr, 0.01, 0.15, 0.6, 0.03) * 0.6
    if kind == "strings":
        t = np.arange(n) / sr
        vib = 1.0 + 0.004 * np.sin(2 * np.pi * 5.2 * t)
        phase = 2 * np.pi * np.cumsum(freq * vib) / sr
        tone = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**1.3 for k in range(1, 9) if freq * k < sr * 0.45)
        return tone * _envelope(n, sr, min(0.25, dur * 0.4), 1.0, 0.8, min(0.2, dur * 0.3)) * 0.6
    if kind == "fm_bell":
        return _fm(freq, n, sr, ratio=3.5, index=4.0, index_decay=0.4) * _envelope(n, sr, 0.002, 0.6, 0.0, 0.02)
    if kind == "fm_epiano":
        return _fm(freq, n, sr, ratio=1.0, index=2.5, index_decay=0.25) * _envelope(n, sr, 0.003, 0.5, 0.2, 0.04)
    if kind == "fm_bass":
        return _fm(freq, n, sr, ratio=0.5, index=3.0, index_decay=0.12) * _envelope(n, sr, 0.003, 0.2, 0.5, 0.03)
    if kind == "sine_bass":
        t = np.arange(n) / sr
        return (np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(4 * np.pi * freq * t)) * _envelope(n, sr, 0.01, 0.4, 0.6, 0.05)
    if kind == "pluck":
        return _karplus_strong(freq, n, sr, rng, 0.996) * _envelope(n, sr, 0.001, 10.0, 1.0, 0.02)
    if kind == "pluck_bass":
        return _karplus_strong(freq, n, sr, rng, 0.998) * _envelope(n, sr, 0.001, 10.0, 1.0, 0.03)
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


# pattern: list of (instrument, position in beats within a bar)
_DRUM_PATTERNS: dict[str, list[tuple[str, float]]] = {
    "rock": [("kick", 0), ("kick", 2), ("kick", 2.5), ("snare", 1), ("snare", 3)]
    + [("hat", i * 0.5) for i in range(8)],
    "four": [("kick", float(i)) for i in range(4)] + [("snare", 1), ("snare", 3)]
    + [("hat", i + 0.5) for i in range(4)] + [("hat", i + 0.75) for i in range(4)],
    "dub": [("kick", 2), ("snare", 2)] + [("hat", i + 0.5) for i in range(4)],
    "march": [("kick", 0), ("kick", 2), ("snare", 1), ("snare", 3), ("snare", 3.5), ("snare", 3.75)],
    "waltz": [("kick", 0), ("hat", 1), ("hat", 2), ("snare", 2)],
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


def synthesize(song: Song) -> np.ndarray:
    """Render `song` as float64 [channels, samples] peaking at song.level_db dBFS."""
    sr = song.sample_rate
    rng = np.random.default_rng(song.seed)
    n_total = int(song.seconds * sr)
    buf = np.zeros((2, n_total + sr))  # one second of slack for ringing notes
    beat = 60.0 / song.tempo
    bar = beat * song.beats_per_bar
    scale = SCALES[song.scale]
    progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    n_bars = int(np.ceil(song.seconds / bar))

    def degree_note(degree: int, octave_shift: int = 0) -> int:
        octave, step = divmod(degree, len(scale))
        return song.root + scale[step] + 12 * (octave + octave_shift)

    melody_degree = 0
    for b in range(n_bars):
        bar_start = b * bar
        chord_root = progression[b % len(progression)]
        chord = [chord_root, chord_root + 2, chord_root + 4]
        if song.pad:
            for i, d in enumerate(chord):
                sig = _render_note(song.pad, _midi_hz(degree_note(d, -1)), bar * 0.98, sr, rng)
                _place(buf, sig, int(bar_start * sr), 0.16, -0.4 + 0.4 * i)
        if song.bass:
            for k in range(song.beats_per_bar):
                if k % 2 == 1 and rng.random() < 0.5:
                    continue
                step = chord_root + (4 if k == song.beats_per_bar - 1 and rng.random() < 0.4 else 0)
                sig = _render_note(song.bass, _midi_hz(degree_note(step, -2)), beat * 0.9, sr, rng)
                _place(buf, sig, int((bar_start + k * beat) * sr), 0.45, 0.0)
        grid = beat / song.notes_per_beat
        for k in range(song.beats_per_bar * song.notes_per_beat):
            if rng.random() < 0.18:  # a rest
                continue
            # random walk, pulled toward chord tones on strong beats
            melody_degree += int(rng.choice([-2, -1, -1, 0, 1, 1, 2]))
            melody_degree = int(np.clip(melody_degree, -3, 2 * len(scale)))
            if k % song.notes_per_beat == 0 and rng.random() < 0.5:
                melody_degree = chord[int(rng.integers(3))]
            length = grid * (2 if rng.random() < 0.25 else 1)
            sig = _render_note(song.lead, _midi_hz(degree_note(melody_degree)), length * 0.95, sr, rng)
            _place(buf, sig, int((bar_start + k * grid) * sr), 0.3, 0.25)
        if song.drums:
            for name, pos in _DRUM_PATTERNS[song.drums]:
                if pos >= song.beats_per_bar:
                    continue
                gain = {"kick": 0.7, "snare": 0.4, "hat": 0.25}[name]
                pan = {"kick": 0.0, "snare": 0.1, "hat": -0.3}[name]
                _place(buf, _drum(name, sr, rng), int((bar_start + pos * beat) * sr), gain, pan)

    out = buf[:, :n_total]
    fade = min(n_total // 4, int(1.5 * sr))
    ramp = np.linspace(0.0, 1.0, fade)
    out[:, :fade] *= ramp
    out[:, n_total - fade :] *= ramp[::-1]
    if song.channels == 1:
        out = out.mean(axis=0, keepdims=True)
    peak = float(np.max(np.abs(out))) or 1.0
    return out * (10.0 ** (song.level_db / 20.0) / peak)


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
    path = out_dir / song.path
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = synthesize(song).T  # soundfile wants [samples, channels]
    if song.bits < 16:
        step = 2.0 ** (1 - song.bits)
        wave = np.round(wave / step) * step
    wave = wave.astype(np.float32)
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


def main(args: argparse.Namespace) -> int:
    synthesize_all(Path(args.out))
    return 0
