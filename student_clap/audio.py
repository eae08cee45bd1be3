"""Decoding, resampling and the one segmentation rule.

No torch here: the ONNX `embed` command imports this module on machines without torch.

Decoding streams the file in blocks (libsndfile reads MP3, Ogg Vorbis, Opus, FLAC, WAV/AIFF;
FFmpeg, through PyAV, what libsndfile cannot: M4A/MP4 with AAC or ALAC, raw AAC, WMA, ...),
downmixes each block to mono, resamples it with a streaming soxr resampler and stores it as int16
— the same int16 round trip CLAP applies — so a 60-minute track costs 2 bytes per output sample
(about 350 MB at 48 kHz) instead of a float64 copy of the whole file.

What the decoder had to do to a file is recorded in a DecodeReport: a stream that ends before its
header's length (a truncated download) is kept as far as it decoded and flagged; NaN/inf samples
are counted. `decode_track` adds the one usability rule (too short, silent, nothing finite) that
the mels stage, `embed` and `index` all apply, so a file is refused everywhere with one reason.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

log = logging.getLogger(__name__)

BLOCK_FRAMES = 1152 * 256  # frames read per block (~6.7 s at 44.1 kHz)
# python-soundfile seeks after every read, and a seek resets libmpg123's bit reservoir, so the
# first frames of the next MP3 block would decode as garbage. Each MP3 block therefore starts this
# many frames early (enough for the 511-byte reservoir even at 8 kbit/s) and the overlap is dropped.
MP3_PREROLL = 1152 * 16
# ... and most MP3s are read in one call (up to this many samples), which avoids the reset
# altogether; only longer files pay the pre-roll.
MP3_SINGLE_READ_SAMPLES = 1 << 24  # 64 MB: a 3-minute stereo 44.1 kHz song
RESAMPLE_QUALITY = "HQ"  # soxr "high quality", librosa's default resampler

# A stream counts as cut short only when it misses more than this: MP3 headers count encoder padding.
PARTIAL_TOLERANCE_SECONDS = 0.1
# When a decoder fails mid-block, the frames before the failure are recovered in steps this small
# (a FLAC block is 4096 frames, so at most one block of good audio is lost).
SALVAGE_FRAMES = 1024
# The one usability rule (decode_track): shorter tracks are refused (a 1-sample file would become
# a 10-s window of one repeated value), and so are tracks whose loudest sample is below this
# level (digital silence and dither-level noise: about 3 int16 steps).
MIN_AUDIO_SECONDS = 0.5
SILENCE_PEAK_DBFS = -80.0

# First bytes of the containers we can decode; used only to word error messages.
_AUDIO_MAGIC = (b"ID3", b"OggS", b"fLaC", b"RIFF", b"RF64", b"FORM", b".snd", b"caff", b"wvpk", b"ADIF",
                b"0&\xb2u\x8e")  # ... ADIF AAC, ASF (WMA)


class AudioDecodeError(Exception):
    """A file that cannot be turned into usable audio; `kind` is one of missing, unreadable, empty,
    non-audio, corrupt (the decoder's verdicts) or too-short, silent, non-finite (the usability rule)."""

    def __init__(self, path: str | Path, reason: str, kind: str = "corrupt") -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{path}: {reason}")


@dataclass
class DecodeReport:
    """What decoding one file found, beyond its samples."""

    expected_seconds: float | None = None  # the header's length (after any max_seconds cap)
    decoded_seconds: float = 0.0
    stopped_early: str = ""  # why the stream ended before the header's length, if it did
    source_samples: int = 0  # samples read from the file, all channels
    nonfinite: int = 0  # of those, NaN or +-inf (replaced by 0 / +-1)
    peak: float = 0.0  # loudest mono sample before resampling: the silence test, whatever the output rate

    @property
    def partial(self) -> bool:
        return bool(self.stopped_early)

    def notes(self) -> list[str]:
        """Human-readable flags for a kept file (empty when nothing is worth saying)."""
        out = []
        if self.partial:
            of = f" of {self.expected_seconds:.1f}" if self.expected_seconds else ""
            out.append(f"partial decode: decoded {self.decoded_seconds:.1f}{of} s; {self.stopped_early}")
        if self.nonfinite:
            out.append(f"{self.nonfinite} of {self.source_samples} samples were NaN/inf (replaced by 0/+-1)")
        return out


@dataclass
class DecodedTrack:
    """An int16 mono waveform that passed the usability rule, and its decode report."""

    wave: np.ndarray
    sample_rate: int
    report: DecodeReport = field(default_factory=DecodeReport)

    @property
    def notes(self) -> list[str]:
        return self.report.notes()


# --------------------------------------------------------------------------- decoding


def _looks_like_audio(head: bytes) -> bool:
    if head.startswith(_AUDIO_MAGIC) or head[4:8] == b"ftyp":  # ftyp: an MP4/M4A container
        return True
    # MPEG audio frame sync: 11 set bits
    return len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0


def _describe_non_audio(head: bytes) -> str | None:
    """A reason string when the first bytes are clearly not audio, else None."""
    if _looks_like_audio(head):
        return None
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml")):
        return "not audio: the file holds an HTML/XML page (a failed download?)"
    if low.startswith((b"{", b"[")):
        return "not audio: the file holds JSON text"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    if head and printable / len(head) > 0.95:
        return "not audio: the file holds plain text"
    return None


def _open(path: Path) -> sf.SoundFile:
    if not path.exists():
        raise AudioDecodeError(path, "file not found", "missing")
    if not path.is_file():
        raise AudioDecodeError(path, "not a regular file", "missing")
    try:
        if path.stat().st_size == 0:
            raise AudioDecodeError(path, "file is empty (0 bytes)", "empty")
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:  # permission denied, I/O error: this file only, the caller goes on
        raise AudioDecodeError(path, f"cannot read the file ({exc.strerror or exc})", "unreadable") from None
    try:
        # bytes on POSIX: soundfile encodes a str name strictly, which fails for names that are
        # not valid UTF-8 (Python holds those bytes as lone surrogates)
        return sf.SoundFile(os.fsencode(path) if os.name == "posix" else path)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        reason = _describe_non_audio(head)
        if reason:
            raise AudioDecodeError(path, reason, "non-audio") from None
        raise AudioDecodeError(path, f"cannot decode ({exc})", "corrupt") from None


def stream_mono(path: str | Path, sample_rate: int, *, max_seconds: float | None = None,
                block_frames: int = BLOCK_FRAMES, report: DecodeReport | None = None) -> Iterator[np.ndarray]:
    """Yield float32 mono blocks of `path` resampled to `sample_rate` (no int16 rounding yet).

    A decoder error after some audio ends the stream there (the good part is kept) and is noted
    in `report`, as is a stream shorter than its header and every NaN/inf sample."""
    path = Path(path)
    report = report if report is not None else DecodeReport()
    try:
        f = _open(path)
    except AudioDecodeError as exc:
        if exc.kind != "corrupt" or not _for_ffmpeg(path):
            raise
        yield from _stream_ffmpeg(path, sample_rate, max_seconds, report, exc)
        return
    with f:
        in_rate = int(f.samplerate)
        if in_rate <= 0 or f.channels <= 0:
            raise AudioDecodeError(path, f"invalid header (rate {in_rate}, channels {f.channels})", "corrupt")
        # soundfile never reads past the frame count libsndfile reports (for MP3 it scans the
        # stream when there is no Xing/INFO header); a stream that ends earlier gives a short read.
        limit = int(f.frames) if f.frames > 0 else None
        if max_seconds:
            cap = int(round(max_seconds * in_rate))
            limit = cap if limit is None else min(limit, cap)
        report.expected_seconds = limit / in_rate if limit else None
        # A CBR MP3 without a Xing/Info/VBRI tag has only a length estimated from the file size:
        # a short read there is the estimate's error, and a cut file's estimate shrinks with it.
        exact_length = f.format != "MP3" or _mp3_has_length_tag(path)
        resampler = (
            soxr.ResampleStream(in_rate, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
            if in_rate != sample_rate
            else None
        )
        is_mp3 = f.format == "MP3"
        if is_mp3:
            block_frames = max(block_frames, min(max(int(f.frames), 0), MP3_SINGLE_READ_SAMPLES // f.channels))
        read = 0
        while True:
            want = block_frames if limit is None else min(block_frames, limit - read)
            failed = ""
            if want <= 0:
                block = np.zeros((0, f.channels), dtype=np.float32)
            else:
                pre = min(read, MP3_PREROLL) if is_mp3 and read > 0 else 0
                try:
                    if pre:
                        f.seek(read - pre)
                    block = f.read(want + pre, dtype="float32", always_2d=True)[pre:]
                except (sf.LibsndfileError, RuntimeError) as exc:
                    failed = _decoder_message(exc)
                    block = _salvage(f, read, want, pre)
                    if read + len(block) == 0:
                        raise AudioDecodeError(path, f"cannot decode any audio ({failed})", "corrupt") from None
            read += len(block)
            last = len(block) < want or want <= 0 or bool(failed)
            if failed:
                report.stopped_early = f"the decoder failed: {failed}"
            elif last and exact_length and limit is not None and limit - read > PARTIAL_TOLERANCE_SECONDS * in_rate:
                report.stopped_early = "the stream ends before the length its header gives; a truncated file?"
            yield from _mono_blocks(block, report, resampler, last)
            del block
            if last:
                break
        report.decoded_seconds = read / in_rate


# Files FFmpeg decodes when libsndfile cannot: by container magic, or by name. A file in one of
# libsndfile's own containers keeps libsndfile's verdict (FFmpeg would decode a corrupt MP3's
# junk as noise rather than refuse it).
FFMPEG_EXTENSIONS = (".m4a", ".m4b", ".mp4", ".aac", ".alac", ".wma", ".wv", ".caf")


def _for_ffmpeg(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    if head[4:8] == b"ftyp" or head.startswith((b"ADIF", b"0&\xb2u\x8e")):
        return True
    if head.startswith((b"ID3", b"OggS", b"fLaC", b"RIFF", b"RF64", b"FORM")):
        return False
    return path.suffix.lower() in FFMPEG_EXTENSIONS


def _mono_blocks(block: np.ndarray, report: DecodeReport, resampler, last: bool) -> Iterator[np.ndarray]:
    """One decoded block [frames, channels] -> resampled float32 mono pieces, with the report's
    sample count, NaN/inf count and peak updated (the same for every decoder)."""
    report.source_samples += block.size
    mono = _downmix(block)
    top, bottom = (float(mono.max()), float(mono.min())) if len(mono) else (0.0, 0.0)
    # A NaN/inf sample in any channel makes its mono sample NaN/inf, so the peak's max/min
    # find broken frames without a pass over every channel.
    if not (math.isfinite(top) and math.isfinite(bottom)):
        # Broken float files carry NaN/inf, which would poison every mel frame: count them
        # for the report, then replace them (before the downmix, so the other channels of
        # the frame survive) and keep the rest of the file.
        report.nonfinite += int(np.count_nonzero(~np.isfinite(block)))
        block = np.nan_to_num(block, nan=0.0, posinf=1.0, neginf=-1.0)
        mono = _downmix(block)
        top, bottom = float(mono.max()), float(mono.min())
    if len(mono):
        report.peak = max(report.peak, top, -bottom)  # no |x| copy
    del block
    # Resample in sub-blocks so a large (single-read MP3) block has small temporaries.
    step = BLOCK_FRAMES
    for pos in range(0, max(len(mono), 1), step):
        piece = mono[pos : pos + step]
        final = last and pos + step >= len(mono)
        out = resampler.resample_chunk(piece, last=final) if resampler is not None else piece
        if len(out):
            yield np.ascontiguousarray(out, dtype=np.float32)


# FFmpeg's sample formats -> the divisor that maps them to [-1, 1) as libsndfile's float reads do
_FFMPEG_SCALE = {"s16": 32768.0, "s16p": 32768.0, "s32": 2147483648.0, "s32p": 2147483648.0, "u8": None,
                 "u8p": None, "flt": 1.0, "fltp": 1.0, "dbl": 1.0, "dblp": 1.0}


def _ffmpeg_frames(frame) -> np.ndarray:
    """A decoded PyAV audio frame -> float32 [frames, channels]."""
    name = frame.format.name
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    arr = arr if frame.format.is_planar else arr.reshape(-1, channels).T  # -> [channels, frames]
    scale = _FFMPEG_SCALE.get(name, 1.0)
    if scale is None:  # unsigned 8-bit
        return ((arr.astype(np.float32) - 128.0) / 128.0).T
    return (arr.astype(np.float32) / np.float32(scale) if scale != 1.0 else arr.astype(np.float32, copy=False)).T


def _stream_ffmpeg(path: Path, sample_rate: int, max_seconds: float | None, report: DecodeReport,
                   refused: AudioDecodeError) -> Iterator[np.ndarray]:
    """stream_mono for what libsndfile cannot read (M4A/MP4 with AAC or ALAC, raw AAC, WMA, ...):
    FFmpeg through PyAV, the same blocks, report and usability rule. `refused`: libsndfile's
    verdict, raised (with FFmpeg's) when FFmpeg cannot read the file either."""
    try:
        import av
    except ImportError:  # PyAV is a base dependency; a stripped install still gets libsndfile's verdict
        raise refused from None

    def fail(why: str) -> AudioDecodeError:
        return AudioDecodeError(path, f"{refused.reason}; FFmpeg: {why}", "corrupt")

    try:
        fh = open(path, "rb")  # a file object: names that are not valid UTF-8 open too
    except OSError as exc:
        raise AudioDecodeError(path, f"cannot read the file ({exc.strerror or exc})", "unreadable") from None
    with fh:
        try:
            container = av.open(fh, mode="r")
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise fail(f"cannot open it ({exc})") from None
        with container:
            if not container.streams.audio:
                raise AudioDecodeError(path, "no audio stream in the file", "non-audio")
            stream = container.streams.audio[0]
            in_rate = int(stream.codec_context.sample_rate or stream.rate or 0)
            if in_rate <= 0:
                raise fail(f"invalid sample rate {in_rate}")
            if stream.duration and stream.time_base:
                report.expected_seconds = float(stream.duration * stream.time_base)
            elif container.duration:
                report.expected_seconds = container.duration / 1_000_000
            limit = int(round(max_seconds * in_rate)) if max_seconds else None
            if limit is not None:
                report.expected_seconds = min(report.expected_seconds or math.inf, limit / in_rate)
            resampler = (soxr.ResampleStream(in_rate, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
                         if in_rate != sample_rate else None)
            pending: list[np.ndarray] = []
            have = read = 0
            frames = container.decode(stream)
            while True:
                failed, done = "", False
                try:
                    frame = next(frames)
                    block = _ffmpeg_frames(frame)
                    if pending and block.shape[1] != pending[0].shape[1]:
                        raise ValueError("the channel count changes mid-stream")
                except StopIteration:
                    block, done = None, True
                except (av.FFmpegError, ValueError) as exc:
                    block, done, failed = None, True, str(exc)
                if block is not None:
                    if limit is not None and read + have + len(block) >= limit:
                        block, done = block[: limit - read - have], True
                    pending.append(block)
                    have += len(block)
                if have >= BLOCK_FRAMES or done:
                    if not pending and read == 0:
                        raise fail(f"cannot decode any audio ({failed})" if failed else "no audio frames")
                    joined = np.concatenate(pending) if pending else np.zeros((0, 1), np.float32)
                    pending, have = [], 0
                    read += len(joined)
                    if failed:
                        report.stopped_early = f"the decoder failed: {failed}"
                    yield from _mono_blocks(joined, report, resampler, done)
                if done:
                    break
    expected = report.expected_seconds
    report.decoded_seconds = read / in_rate
    if (not report.stopped_early and expected and limit is None
            and expected - report.decoded_seconds > PARTIAL_TOLERANCE_SECONDS):
        report.stopped_early = "the stream ends before the length its header gives; a truncated file?"


def _downmix(block: np.ndarray) -> np.ndarray:
    """[frames, channels] float32 -> mono float32 (the channels' mean)."""
    if block.shape[1] == 2:  # the common case, without a generic reduction
        return (block[:, 0] + block[:, 1]) * np.float32(0.5)
    if block.shape[1] > 2:
        return block.mean(axis=1, dtype=np.float32)
    return block[:, 0]


def _mp3_has_length_tag(path: Path) -> bool:
    """Whether the first MPEG frame (after any ID3v2 tag) carries a Xing, Info or VBRI header,
    i.e. whether the decoder's frame count is exact rather than estimated from the file size."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(10)
            if head[:3] == b"ID3" and len(head) == 10:  # skip the tag: 4 syncsafe size bytes
                size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
                fh.seek(10 + size + (10 if head[5] & 0x10 else 0))  # + footer
                head = b""
            data = head + fh.read(8192)
    except OSError:
        return False
    for i in range(len(data) - 1):
        if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0:  # first frame sync
            frame = data[i : i + 64]
            return any(tag in frame for tag in (b"Xing", b"Info", b"VBRI"))
    return False


def _decoder_message(exc: Exception) -> str:
    text = str(exc).strip().removeprefix("Error :").strip()
    return text or type(exc).__name__


def _salvage(f: sf.SoundFile, start: int, want: int, pre: int) -> np.ndarray:
    """The frames from `start` that still decode after a failed read of `want` frames, read again
    in small steps until the decoder fails again (so a truncated FLAC keeps all but < 1 block)."""
    pieces, got = [], 0
    try:
        f.seek(start - pre)
        if pre:
            f.read(pre, dtype="float32", always_2d=True)
        while got < want:
            piece = f.read(min(SALVAGE_FRAMES, want - got), dtype="float32", always_2d=True)
            pieces.append(piece)
            got += len(piece)
            if len(piece) < SALVAGE_FRAMES:
                break
    except (sf.LibsndfileError, RuntimeError):
        pass
    return np.concatenate(pieces) if pieces else np.zeros((0, f.channels), dtype=np.float32)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float in [-1, 1] -> int16, clipping as CLAP's int16 round trip does."""
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def to_int16_into(x: np.ndarray, out: np.ndarray) -> None:
    """to_int16(x) written into `out` (same length), with `x` (float32, owned by the caller) as
    scratch: the same values without two temporaries of the block's size."""
    np.clip(x, -1.0, 1.0, out=x)
    x *= np.float32(32767.0)
    out[...] = x  # float -> int16 assignment truncates toward zero, as astype does


def int16_to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / np.float32(32767.0)


def _decode_into_int16(path: Path, sample_rate: int, max_seconds: float | None, report: DecodeReport) -> np.ndarray:
    """int16 mono at `sample_rate`, possibly empty; memory bounded by the output size.

    The output buffer is sized from the header's frame count and grown by a quarter when a
    header under-reports (VBR MP3 without a seek table)."""
    try:
        info = sf.info(os.fsencode(path) if os.name == "posix" else str(path))
        frames, in_rate = int(info.frames), int(info.samplerate)
    except Exception:  # not libsndfile's (FFmpeg decodes it) or broken: the decode says which
        frames, in_rate = 0, 1
    if max_seconds:
        frames = min(frames, int(round(max_seconds * in_rate)))
    expect = int(math.ceil(max(frames, 0) * sample_rate / max(in_rate, 1))) + 64
    buf = np.empty(expect, dtype=np.int16)
    n = 0
    for block in stream_mono(path, sample_rate, max_seconds=max_seconds, report=report):
        if n + len(block) > len(buf):
            grown = np.empty(max(n + len(block), len(buf) + len(buf) // 2 + (1 << 16)), dtype=np.int16)
            grown[:n] = buf[:n]
            buf = grown
        to_int16_into(block, buf[n : n + len(block)])  # stream_mono's blocks are fresh arrays
        n += len(block)
    return buf[:n]


def decode_int16(path: str | Path, sample_rate: int, *, max_seconds: float | None = None,
                 report: DecodeReport | None = None) -> np.ndarray:
    """Decode to int16 mono at `sample_rate`; `report` (if given) receives what the decoder found.

    Raises AudioDecodeError for missing, unreadable, empty, non-audio and corrupt files; does not
    apply the usability rule (see decode_track)."""
    path = Path(path)
    wave = _decode_into_int16(path, sample_rate, max_seconds, report if report is not None else DecodeReport())
    if len(wave) == 0:
        raise AudioDecodeError(path, "no audio frames (zero-length audio stream)", "empty")
    return wave


def decode_track(path: str | Path, sample_rate: int, *, max_seconds: float | None = None) -> DecodedTrack:
    """Decode a song for the mel cache, `embed` or `index`: decode_int16 plus the one usability
    rule (check_usable), so every command keeps or refuses a file alike and for the same reason."""
    path = Path(path)
    report = DecodeReport()
    wave = _decode_into_int16(path, sample_rate, max_seconds, report)
    check_usable(wave, sample_rate, report, path)
    return DecodedTrack(wave, sample_rate, report)


def _dbfs(peak: float) -> float:
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def peak_dbfs(wave: np.ndarray) -> float:
    """Loudest sample in dB relative to full scale (-inf for all zeros); int16 or float input."""
    if wave.dtype == np.int16:
        return _dbfs(float(np.max(np.abs(wave.astype(np.int32)), initial=0)) / 32767.0)
    return _dbfs(float(np.max(np.abs(wave), initial=0.0)))


def check_usable(wave: np.ndarray, sample_rate: int, report: DecodeReport | None = None,
                 path: str | Path = "<waveform>") -> None:
    """THE usability rule: raise AudioDecodeError (kind non-finite, empty, too-short or silent)
    for audio no command should embed. With a report, length and loudness are measured on the
    file's own samples, so the verdict and its wording do not depend on the rate a command decodes at."""
    if report is not None and report.source_samples and report.nonfinite >= report.source_samples:
        raise AudioDecodeError(path, f"no usable samples: all {report.source_samples} samples are NaN or infinite",
                               "non-finite")
    if len(wave) == 0 and (report is None or report.source_samples == 0):
        raise AudioDecodeError(path, "no audio frames (zero-length audio stream)", "empty")
    seconds = report.decoded_seconds if report is not None else len(wave) / sample_rate
    if seconds < MIN_AUDIO_SECONDS or len(wave) == 0:
        raise AudioDecodeError(path, f"too short: {seconds:.3f} s of audio, the minimum is {MIN_AUDIO_SECONDS} s",
                               "too-short")
    peak = _dbfs(report.peak) if report is not None else peak_dbfs(wave)
    if peak < SILENCE_PEAK_DBFS:
        what = "every sample is zero" if peak == -math.inf else f"the loudest sample is {peak:.1f} dBFS"
        raise AudioDecodeError(path, f"silent: {what} (the threshold is {SILENCE_PEAK_DBFS:.0f} dBFS)", "silent")


def decode(path: str | Path, sample_rate: int, *, max_seconds: float | None = None) -> np.ndarray:
    """Decode any supported file to float32 mono at `sample_rate`, int16 round-tripped.

    Raises AudioDecodeError(path, reason) for missing, empty, non-audio and corrupt files.
    Silence decodes fine (all zeros); callers decide whether that is a problem."""
    return int16_to_float(decode_int16(path, sample_rate, max_seconds=max_seconds))


def resample_int16(wave: np.ndarray, in_rate: int, out_rate: int, block: int = 1 << 20) -> np.ndarray:
    """Resample an int16 waveform in blocks (bounded float memory) and round back to int16."""
    if in_rate == out_rate:
        return wave.copy()
    out = np.empty(int(math.ceil(len(wave) * out_rate / in_rate)) + 64, dtype=np.int16)
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    n = 0
    for pos in range(0, max(len(wave), 1), block):
        chunk = int16_to_float(wave[pos : pos + block])
        res = stream.resample_chunk(chunk, last=pos + block >= len(wave))
        if n + len(res) > len(out):  # soxr never exceeds ceil(n * ratio) + a few; be safe anyway
            out = np.concatenate([out[:n], np.empty(len(res), dtype=np.int16)])
        out[n : n + len(res)] = to_int16(res)
        n += len(res)
    return out[:n]


class ResampledWindow:
    """The int16 waveform resampled to another rate, produced lazily and kept only from a moving
    start: the same samples resample_int16 gives for the whole track, without holding all of them.

    `view(start, stop)` returns (array, offset) where array[offset + i] is output sample start + i
    (samples past the end of the track are simply absent); `release(before)` drops older samples."""

    def __init__(self, wave: np.ndarray, in_rate: int, out_rate: int, block: int = 1 << 18) -> None:
        self.wave, self.block = wave, block
        self.stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        self.buf = np.zeros(0, dtype=np.int16)
        self.base = 0  # output index of buf[0]
        self.fed = 0  # input samples consumed
        self.done = in_rate == out_rate
        if self.done:
            self.buf = wave

    def _pull(self) -> None:
        chunk = int16_to_float(self.wave[self.fed : self.fed + self.block])
        self.fed += len(chunk)
        self.done = self.fed >= len(self.wave)
        out = to_int16(self.stream.resample_chunk(chunk, last=self.done))
        self.buf = np.concatenate([self.buf, out]) if len(self.buf) else out

    def view(self, start: int, stop: int) -> tuple[np.ndarray, int]:
        while not self.done and self.base + len(self.buf) < stop:
            self._pull()
        return self.buf, self.base

    def release(self, before: int) -> None:
        drop = min(max(0, before - self.base), len(self.buf))
        if drop and not (self.done and self.buf is self.wave):
            self.buf = self.buf[drop:].copy()
            self.base += drop


def is_silent(wave: np.ndarray) -> bool:
    """True when the loudest sample is below SILENCE_PEAK_DBFS (the silence half of check_usable)."""
    return peak_dbfs(wave) < SILENCE_PEAK_DBFS


# --------------------------------------------------------------------------- segmentation


def segment_length(sample_rate: int, segment_seconds: float) -> int:
    return int(round(segment_seconds * sample_rate))


def segment_starts(n_samples: int, sample_rate: int, segment_seconds: float, hop_seconds: float) -> list[int]:
    """Start samples of the segments of a track of n_samples — THE segmentation rule.

    Windows of segment_seconds every hop_seconds; a track no longer than one window gives one
    (repeat-padded) segment; a final window aligned to the end is added only when it covers
    samples no earlier window covered (so aligned lengths get no duplicate)."""
    if n_samples <= 0:
        return []
    seg = segment_length(sample_rate, segment_seconds)
    hop = segment_length(sample_rate, hop_seconds)
    if hop <= 0 or seg <= 0:
        raise ValueError(f"segment ({segment_seconds} s) and hop ({hop_seconds} s) must be positive")
    if n_samples <= seg:
        return [0]
    starts = list(range(0, n_samples - seg + 1, hop))
    if starts[-1] + seg < n_samples:
        starts.append(n_samples - seg)
    return starts


def map_starts(starts: list[int], from_rate: int, to_rate: int) -> list[int]:
    """The same segment times at another sample rate (so student and teacher segments align)."""
    return [int(round(s * to_rate / from_rate)) for s in starts]


def repeat_pad(wave: np.ndarray, length: int) -> np.ndarray:
    """Short clip -> whole repeats then zeros up to length (laion_clap's "repeatpad")."""
    if len(wave) >= length:
        return wave[:length]
    if len(wave) == 0:
        return np.zeros(length, dtype=wave.dtype)
    reps = length // len(wave)
    out = np.zeros(length, dtype=wave.dtype)
    out[: reps * len(wave)] = np.tile(wave, reps)
    return out


def cut(wave: np.ndarray, starts: list[int], length: int) -> np.ndarray:
    """[len(starts), length] windows of wave; a window running past the end is repeat-padded when
    it is the whole track, else zero-filled (only ever a resampling-rounding sample or two)."""
    out = np.zeros((len(starts), length), dtype=wave.dtype)
    for i, s in enumerate(starts):
        if s == 0 and len(wave) < length:
            out[i] = repeat_pad(wave, length)
        else:
            piece = wave[s : s + length]
            out[i, : len(piece)] = piece
    return out


def segments(wave: np.ndarray, sample_rate: int, segment_seconds: float, hop_seconds: float) -> np.ndarray:
    """[n_seg, seg_len] segments of a mono waveform by the one rule (see segment_starts)."""
    starts = segment_starts(len(wave), sample_rate, segment_seconds, hop_seconds)
    return cut(wave, starts, segment_length(sample_rate, segment_seconds))
