"""mels: manifest audio -> teacher (CLAP) and student (EfficientAT) log-mels in data/mels.h5.

Reads params `audio`, `frontend` and `mels` only. Every track is decoded once at audio.sample_rate
(48 kHz, int16 round trip), cut by the one segmentation rule into 10-s windows and turned into the
teacher log-mel; the same int16 waveform resampled to the student rate is cut at the same times
into the student log-mel; the cache keeps each front-end's frames once per track and every segment
reads back exactly as computed. Workers write one crash-safe part file per finished track (see
pipeline/data/mel_cache.py), so a killed run resumes where it stopped; the parts are merged into the cache
in manifest order at the end. The work is done by pipeline/data/mel_build.py (resume, schedule, merge,
report), mel_workers.py (the worker pool) and mel_extraction.py (one track). With cluster.ray_address
set, Ray tasks on a cluster compute the tracks instead of the pool (mel_ray.py; docs/cluster.md) and
the cache is byte-identical.

Bad tracks (missing, unreadable, empty, non-audio, corrupt, and by the one usability rule of
pipeline/data/audio.py too short, silent or all NaN) are reported in models/report/mels.json and
skipped; kept tracks the decoder had to patch (a partial decode, NaN/inf samples) are listed there
as flagged. The stage fails only when no track is usable or when more than
mels.max_failure_ratio of the tracks failed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.data.mel_build import MelInputError, build_mel_cache, failure_verdict
from pipeline.params import Params
from pipeline.paths import MANIFEST
from pipeline.paths import MELS as CACHE

log = logging.getLogger(__name__)

REPORT = Path("models/report/mels.json")


def _outputs(args: argparse.Namespace) -> tuple[Path, Path]:
    shard = getattr(args, "shard", None)
    cache = Path(getattr(args, "mels_out", None) or CACHE)
    report = Path(getattr(args, "report_out", None) or REPORT)
    if shard:
        k, n = shard
        cache = cache.with_name(f"{cache.stem}.shard-{k}-of-{n}{cache.suffix}")
        report = report.with_name(f"{report.stem}.shard-{k}-of-{n}{report.suffix}")
    return cache, report


def run(params: Params, args: argparse.Namespace) -> int:
    cache_path, report_path = _outputs(args)
    manifest_path = Path(getattr(args, "manifest", None) or MANIFEST)
    try:
        report = build_mel_cache(params, manifest_path, cache_path, report_path, getattr(args, "shard", None))
    except MelInputError as exc:
        log.error("%s", exc)
        return 1
    problem = failure_verdict(report, params.mels.max_failure_ratio, report_path)
    if problem:
        log.error("%s", problem)
        return 1
    return 0
