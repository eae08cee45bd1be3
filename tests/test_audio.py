"""Decoding, resampling, int16 round trip, bad input and the segmentation rule (pipeline/data/audio.py),
plus the demo songs the synthesiser commits."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from student_clap import audio
from student_clap.audio import AudioDecodeError, decode, segment_starts, segments

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "audio"


def tone(sr: int, seconds: float, freq: float = 440.0, amp: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


FORMATS = [
    # (name, suffix, format, subtype, rate, channels, extra kwargs)
    ("mp3-44k-stereo", "mp3", "MP3", "MPEG_LAYER_III", 44100, 2, {}),
    ("mp3-22k-vbr", "mp3", "MP3", "MPEG_LAYER_III", 22050, 1, {"bitrate_mode": "VARIABLE"}),
    ("vorbis", "ogg", "OGG", "VORBIS", 44100, 2, {}),
    ("opus", "opus", "OGG", "OPUS", 48000, 1, {}),
    ("flac-8", "flac", "FLAC", "PCM_S8", 22050, 1, {}),
    ("flac-16", "flac", "FLAC", "PCM_16", 44100, 2, {}),
    ("flac-24-96k", "flac", "FLAC", "PCM_24", 96000, 2, {}),
    ("wav-u8", "wav", "WAV", "PCM_U8", 22050, 1, {}),
    ("wav-16", "wav", "WAV", "PCM_16", 32000, 1, {}),
    ("wav-float", "wav", "WAV", "FLOAT", 48000, 2, {}),
    ("wav-6ch", "wav", "WAV", "PCM_16", 48000, 6, {}),
]


@pytest.mark.parametrize("name,suffix,fmt,subtype,sr,channels,kwargs", FORMATS, ids=[f[0] for f in FORMATS])
def test_decodes_real_world_formats(tmp_path, name, suffix, fmt, subtype, sr, channels, kwargs):
    path = tmp_path / f"{name}.{suffix}"
    sf.write(path, tone(sr, 2.0, channels=channels), sr, format=fmt, subtype=subtype, **kwargs)
    wave = decode(path, 48000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 48000 - 2.0) < 0.1  # lossy codecs add/remove a few ms of padding
    assert abs(peak_hz(wave, 48000) - 440.0) < 2.0
    mid = wave[len(wave) // 4 : 3 * len(wave) // 4]
    assert 0.4 < np.max(np.abs(mid)) < 0.6  # the level survives downmix and resampling
    # int16 round trip: every sample is k / 32767
    k = wave.astype(np.float64) * 32767.0
    assert np.allclose(k, np.round(k), atol=1e-3)


def _id3v24(cover: bytes) -> bytes:
    def syncsafe(n: int) -> bytes:
        return bytes([(n >> 21) & 0x7F, (n >> 14) & 0x7F, (n >> 7) & 0x7F, n & 0x7F])

    def frame(fid: bytes, data: bytes) -> bytes:
        return fid + syncsafe(len(data)) + b"\0\0" + data

    frames = (
        frame(b"TIT2", b"\x03Morning Walk")
        + frame(b"TPE1", b"\x03Lumen Quartet \xe2\x99\xab")
        + frame(b"APIC", b"\x00image/png\x00\x03\x00" + cover)
    )
    return b"ID3\x04\x00\x00" + syncsafe(len(frames)) + frames


def test_mp3_with_id3v24_tag_and_cover_art(tmp_path):
    buf = io.BytesIO()
    sf.write(buf, tone(44100, 2.0), 44100, format="MP3")
    cover = b"\x89PNG\r\n\x1a\n" + np.random.default_rng(0).bytes(300_000)
    path = tmp_path / "tagged.mp3"
    path.write_bytes(_id3v24(cover) + buf.getvalue())
    wave = decode(path, 48000)
    assert abs(len(wave) / 48000 - 2.0) < 0.1
    assert abs(peak_hz(wave, 48000) - 440.0) < 2.0
    # the length tag is found behind the ID3 tag: cut in the audio, the file is flagged
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(buf.getvalue()) // 2])
    (note,) = audio.decode_track(path, 48000).notes
    assert note.startswith("partial decode: decoded 0.9 of 2.0 s; the stream ends")


def test_mp3_read_in_blocks_equals_one_read(tmp_path, monkeypatch):
    """libsndfile resets the MP3 bit reservoir on every seek; blocks must still decode exactly."""
    sr = 22050
    rng = np.random.default_rng(1)
    x = (0.3 * rng.standard_normal(sr * 6)).astype(np.float32)  # noise strains the reservoir
    path = tmp_path / "low.mp3"
    sf.write(path, x, sr, format="MP3", compression_level=0.95, bitrate_mode="CONSTANT")
    whole, _ = sf.read(path, dtype="float32")
    monkeypatch.setattr(audio, "MP3_SINGLE_READ_SAMPLES", 1000)
    blocks = np.concatenate(list(audio.stream_mono(path, sr, block_frames=10_000)))
    assert len(blocks) == len(whole)
    np.testing.assert_allclose(blocks, whole, atol=1e-6)


def test_stereo_is_averaged_to_mono(tmp_path):
    left = tone(48000, 1.0)[:, 0]
    path = tmp_path / "st.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 48000, subtype="PCM_16")
    wave = decode(path, 48000)
    assert abs(np.max(np.abs(wave)) - 0.25) < 1e-3
    sf.write(path, np.stack([left, -left], axis=1), 48000, subtype="PCM_16")
    assert audio.is_silent(decode(path, 48000))


def test_resampling_is_high_quality_and_streaming_matches_one_shot(tmp_path):
    sr = 44100
    x = tone(sr, 3.0, freq=1000.0, amp=0.5)[:, 0]
    path = tmp_path / "t.flac"
    sf.write(path, x, sr, subtype="PCM_24")
    streamed = np.concatenate(list(audio.stream_mono(path, 48000, block_frames=5000)))
    one_shot = soxr.resample(x, sr, 48000, quality="HQ")
    assert len(streamed) == len(one_shot)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)
    t = np.arange(len(streamed)) / 48000
    ideal = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    inner = slice(4800, len(t) - 4800)
    assert np.max(np.abs(streamed[inner] - ideal[inner])) < 1e-4


def test_int16_round_trip_clips_like_clap(tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.array([0.0, 1.5, -2.0, 0.25, np.nan], dtype=np.float32), 48000, subtype="FLOAT")
    wave = decode(path, 48000)
    np.testing.assert_allclose(wave, [0.0, 1.0, -1.0, int(0.25 * 32767) / 32767, 0.0], atol=1e-7)


def test_max_seconds_truncates(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, tone(22050, 5.0), 22050, subtype="PCM_16")
    assert abs(len(decode(path, 48000, max_seconds=2.0)) - 96000) <= 2


def test_resample_int16_matches_decoding_at_the_target_rate(tmp_path):
    path = tmp_path / "a.wav"
    sf.write(path, tone(48000, 2.0, freq=300.0), 48000, subtype="PCM_16")
    w48 = audio.decode_int16(path, 48000)
    w32 = audio.resample_int16(w48, 48000, 32000)
    assert w32.dtype == np.int16 and abs(len(w32) - 64000) <= 1
    direct = audio.decode_int16(path, 32000)
    assert np.max(np.abs(w32.astype(int) - direct.astype(int))[100:-100]) <= 2


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(AudioDecodeError) as err:
        decode(tmp_path / "nope.mp3", 48000)
    assert err.value.kind == "missing" and "nope.mp3" in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.flac"
    path.write_bytes(b"")
    with pytest.raises(AudioDecodeError) as err:
        decode(path, 48000)
    assert err.value.kind == "empty"


def test_zero_length_audio(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), 44100, subtype="PCM_16")
    with pytest.raises(AudioDecodeError) as err:
        decode(path, 48000)
    assert err.value.kind == "empty"


def test_html_with_audio_extension_is_non_audio(tmp_path):
    path = tmp_path / "page.mp3"
    path.write_bytes(b"<!DOCTYPE html><html><body>404</body></html>\n" * 20)
    with pytest.raises(AudioDecodeError) as err:
        decode(path, 48000)
    assert err.value.kind == "non-audio" and "HTML" in err.value.reason


def test_random_bytes_are_corrupt(tmp_path):
    path = tmp_path / "noise.flac"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(AudioDecodeError) as err:
        decode(path, 48000)
    assert err.value.kind in ("corrupt", "non-audio") and str(path) in str(err.value)


def truncated(tmp_path: Path, name: str, seconds: float = 20.0, **kwargs) -> tuple[Path, Path]:
    """A noisy tone written whole to `name` and cut to its first half (bytes) in `cut_<name>`."""
    sr = 22050
    x = tone(sr, seconds)[:, 0] + 0.05 * np.random.default_rng(0).standard_normal(int(sr * seconds)).astype(np.float32)
    whole, cut_file = tmp_path / name, tmp_path / f"cut_{name}"
    sf.write(whole, x, sr, **kwargs)
    data = whole.read_bytes()
    cut_file.write_bytes(data[: len(data) // 2])
    return whole, cut_file


def test_truncated_flac_keeps_what_decoded_and_says_so(tmp_path):
    whole, cut_file = truncated(tmp_path, "a.flac", subtype="PCM_16")
    track = audio.decode_track(cut_file, 22050)  # the file's rate: no resampler tail to compare around
    full = audio.decode_int16(whole, 22050)
    # about half of the 20 s decodes (all but less than one 4096-frame FLAC block of it) and is
    # sample for sample the start of the whole file
    assert 9.0 < len(track.wave) / 22050 < 10.5
    np.testing.assert_array_equal(track.wave, full[: len(track.wave)])
    assert track.report.partial
    (note,) = track.notes
    assert note.startswith(f"partial decode: decoded {track.report.decoded_seconds:.1f} of 20.0 s")
    assert "the decoder failed" in note


@pytest.mark.parametrize("name,kwargs", [("a.mp3", {}), ("v.mp3", {"bitrate_mode": "VARIABLE"})])
def test_truncated_mp3_is_kept_and_flagged(tmp_path, name, kwargs):
    _, cut_file = truncated(tmp_path, name, **kwargs)
    track = audio.decode_track(cut_file, 48000)
    assert 9.0 < len(track.wave) / 48000 < 10.5
    assert track.notes == [(f"partial decode: decoded {track.report.decoded_seconds:.1f} of 20.0 s; "
                            "the stream ends before the length its header gives; a truncated file?")]


def test_whole_files_carry_no_notes(tmp_path):
    # a CBR MP3 has no length tag: its frame count is an estimate the decode may fall short of
    for name, kwargs in (("a.mp3", {}), ("c.mp3", {"bitrate_mode": "CONSTANT"}), ("a.flac", {}), ("a.ogg", {}),
                         ("a.wav", {"subtype": "FLOAT"})):
        whole, _ = truncated(tmp_path, name, seconds=4.0, **kwargs)
        track = audio.decode_track(whole, 48000)
        assert track.notes == [] and not track.report.partial, name
        assert abs(len(track.wave) - 4 * 48000) < 100


def test_truncated_ogg_keeps_what_decoded(tmp_path):
    # Ogg's length comes from its last page, so a cut file looks whole: kept, not flagged (a known limit)
    _, cut_file = truncated(tmp_path, "a.ogg")
    assert 8.0 < len(audio.decode_track(cut_file, 48000).wave) / 48000 < 10.5


def test_nan_and_inf_samples_are_counted_and_reported(tmp_path):
    path = tmp_path / "holes.wav"
    x = tone(22050, 2.0, channels=2)
    x[100:103, 0] = np.nan
    x[500, 1] = np.inf
    x[600, :] = -np.inf
    sf.write(path, x, 22050, subtype="FLOAT")
    track = audio.decode_track(path, 22050)
    assert track.report.nonfinite == 6 and track.report.source_samples == x.size
    assert track.notes == [f"6 of {x.size} samples were NaN/inf (replaced by 0/+-1)"]
    assert abs(int(track.wave[101]) - int(0.5 * x[101, 1] * 32767)) <= 1  # the NaN counts as 0, the other channel stays
    assert abs(int(track.wave[500]) - int(0.5 * (x[500, 0] + 1.0) * 32767)) <= 1  # +inf counts as +1
    assert track.wave[600] == -32767  # -inf clipped to -1


def one_sample_wav(tmp_path: Path) -> Path:
    path = tmp_path / "one.wav"
    sf.write(path, np.array([0.5], np.float32), 22050, subtype="PCM_16")
    return path


def unusable_files(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """File -> (path, kind, exact reason) of the usability rule's refusals."""
    zeros, nan, hum = tmp_path / "zeros.wav", tmp_path / "nan.wav", tmp_path / "hum.wav"
    sf.write(zeros, np.zeros(44100, np.float32), 22050, subtype="PCM_16")
    sf.write(nan, np.full((22050, 2), np.nan, np.float32), 22050, subtype="FLOAT")
    sf.write(hum, np.full(44100, 2 / 32767, np.float32), 22050, subtype="PCM_16")  # 2 LSB: -84.3 dBFS
    return {
        "one": (one_sample_wav(tmp_path), "too-short", "too short: 0.000 s of audio, the minimum is 0.5 s"),
        "zeros": (zeros, "silent", "silent: every sample is zero (the threshold is -80 dBFS)"),
        "nan": (nan, "non-finite", "no usable samples: all 44100 samples are NaN or infinite"),
        "hum": (hum, "silent", "silent: the loudest sample is -84.3 dBFS (the threshold is -80 dBFS)"),
    }


@pytest.mark.parametrize("rate", [48000, 24000, 22050])
def test_one_usability_rule_refuses_short_silent_and_nan_files(tmp_path, rate):
    for name, (path, kind, reason) in unusable_files(tmp_path).items():
        with pytest.raises(AudioDecodeError) as err:
            audio.decode_track(path, rate)
        assert (err.value.kind, err.value.reason) == (kind, reason), name
        assert str(path) in str(err.value)
    quiet = tmp_path / "quiet.wav"  # -60 dBFS is quiet music, not silence
    sf.write(quiet, tone(22050, 1.0, amp=0.001), 22050, subtype="PCM_16")
    assert len(audio.decode_track(quiet, rate).wave) == rate


def test_plain_decode_still_returns_short_and_silent_audio(tmp_path):
    # decode/decode_int16 only decode; the rule lives in decode_track (and check_usable)
    assert len(decode(one_sample_wav(tmp_path), 22050)) == 1


def test_unreadable_file_is_reported_as_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "locked.wav"
    sf.write(path, tone(22050, 1.0), 22050, subtype="PCM_16")
    real_open = open

    def guarded(file, *a, **kw):  # what a 0000-mode file gives a non-root user
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(audio, "open", guarded, raising=False)
    with pytest.raises(AudioDecodeError) as err:
        audio.decode_track(path, 48000)
    assert err.value.kind == "unreadable" and err.value.reason == "cannot read the file (Permission denied)"


def test_silence_decodes_and_is_flagged_silent(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(22050, dtype=np.float32), 22050, subtype="PCM_16")
    wave = decode(path, 48000)
    assert len(wave) == 48000 and audio.is_silent(wave)
    assert not audio.is_silent(decode_tone(tmp_path))


def decode_tone(tmp_path: Path) -> np.ndarray:
    path = tmp_path / "tone.wav"
    sf.write(path, tone(22050, 1.0), 22050, subtype="PCM_16")
    return decode(path, 48000)


# --------------------------------------------------------------------------- segmentation


SR = 48000
SEG = 480000
HOP = 240000


@pytest.mark.parametrize(
    "n,expected",
    [
        (1, [0]),
        (SEG - 1, [0]),
        (SEG, [0]),  # exactly one window: no tail duplicate
        (SEG + 1, [0, 1]),  # the tail adds one new sample
        (SEG + HOP, [0, HOP]),  # aligned: no duplicate of the last window
        (SEG + HOP + 7, [0, HOP, HOP + 7]),
        (2 * SEG, [0, HOP, 2 * HOP]),
        (3 * SEG - 5, [0, HOP, 2 * HOP, 3 * HOP, 4 * HOP - 5]),
    ],
)
def test_segment_starts_rule(n, expected):
    assert segment_starts(n, SR, 10.0, 5.0) == expected


def test_every_sample_is_covered_and_no_window_is_redundant():
    rng = np.random.default_rng(0)
    for n in rng.integers(SEG + 1, 6 * SEG, 50):
        starts = segment_starts(int(n), SR, 10.0, 5.0)
        covered = np.zeros(n, bool)
        for s in starts:
            assert 0 <= s and s + SEG <= n
            new = ~covered[s : s + SEG]
            assert new.any(), "a window that adds no audio"
            covered[s : s + SEG] = True
        assert covered.all()


def test_empty_track_has_no_segments():
    assert segment_starts(0, SR, 10.0, 5.0) == []


def test_short_track_is_repeat_padded_like_clap():
    sr = 100
    wave = np.arange(1, 301, dtype=np.float32)  # 3 s at 100 Hz; a segment is 1000 samples
    seg = segments(wave, sr, 10.0, 5.0)
    assert seg.shape == (1, 1000)
    np.testing.assert_array_equal(seg[0, :900], np.tile(wave, 3))
    np.testing.assert_array_equal(seg[0, 900:], 0)


def test_segments_are_the_windows_of_the_rule():
    sr = 100
    wave = np.random.default_rng(0).standard_normal(2345).astype(np.float32)
    seg = segments(wave, sr, 10.0, 5.0)
    starts = segment_starts(len(wave), sr, 10.0, 5.0)
    assert seg.shape == (len(starts), 1000)
    for row, s in zip(seg, starts):
        np.testing.assert_array_equal(row, wave[s : s + 1000])
    np.testing.assert_array_equal(seg[-1], wave[-1000:])


def test_mapped_starts_cover_the_same_times():
    starts = segment_starts(1_234_567, 48000, 10.0, 5.0)
    mapped = audio.map_starts(starts, 48000, 32000)
    for a, b in zip(starts, mapped):
        assert abs(a / 48000 - b / 32000) <= 1 / 32000


# --------------------------------------------------------------------------- demo songs


def test_demo_songs_decode_and_match_the_demo_table():
    from pipeline.data.demo_audio import CORRUPT_FILES, SONGS

    if not DEMO.exists():
        pytest.skip(f"{DEMO} not generated")
    assert len(SONGS) == 36  # 35 usable + the one the licence policy must exclude
    for song in SONGS:
        path = DEMO / song.path
        info = sf.info(path)
        assert (info.samplerate, info.channels) == (song.sample_rate, song.channels), song.path
        assert 10.0 <= info.duration <= 61.0
        assert audio.decode_track(path, 48000).notes == [], song.path  # whole files: nothing to flag
    for rel in CORRUPT_FILES:
        with pytest.raises(AudioDecodeError) as err:
            decode(DEMO / rel, 48000)
        assert err.value.kind == "non-audio"
    assert not (DEMO / "wikimedia" / "Lost_Recording.ogg").exists()
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 5_000_000


@pytest.mark.slow
def test_demo_songs_differ_spectrally():
    import librosa

    from pipeline.data.demo_audio import SONGS

    if not DEMO.exists():
        pytest.skip(f"{DEMO} not generated")
    profiles = []
    for song in SONGS:
        wave = decode(DEMO / song.path, 22050, max_seconds=12.0)
        mel = librosa.power_to_db(librosa.feature.melspectrogram(y=wave, sr=22050, n_mels=40))
        profiles.append(np.concatenate([mel.mean(axis=1), mel.std(axis=1)]))
    p = np.array(profiles)
    p = (p - p.mean(axis=0)) / (p.std(axis=0) + 1e-9)
    dist = np.linalg.norm(p[:, None] - p[None], axis=-1)
    off_diag = dist[~np.eye(len(p), dtype=bool)]
    assert off_diag.min() > 0.15 * np.median(off_diag)  # no two songs are near-duplicates
    # (songs sharing a lead instrument are alike by design; the demo teacher's tests check the leads are audible)


def test_synthesis_is_deterministic():
    from pipeline.data.demo_audio import SONGS, synthesize

    song = dataclasses.replace(SONGS[0], seconds=3.0, sample_rate=8000, channels=2)
    a, b = synthesize(song), synthesize(song)
    np.testing.assert_array_equal(a, b)
    other = synthesize(dataclasses.replace(song, seed=song.seed + 1))
    assert not np.allclose(a, other)


def test_resampled_window_gives_the_whole_track_resample_piece_by_piece():
    rng = np.random.default_rng(3)
    wave = audio.to_int16(0.3 * rng.standard_normal(48000 * 7).astype(np.float32))
    whole = audio.resample_int16(wave, 48000, 32000)
    win = audio.ResampledWindow(wave, 48000, 32000, block=10_000)
    for start in range(0, len(whole), 50_000):
        buf, base = win.view(start, start + 60_000)
        piece = buf[start - base : start + 60_000 - base]
        np.testing.assert_array_equal(piece, whole[start : start + 60_000])
        win.release(start + 40_000)
    assert base > 0 and len(buf) < len(whole)  # old samples were dropped
