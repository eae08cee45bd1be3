"""Stage teacher: embed every cached segment and every text query with the teacher -> data/teacher.h5.

Reads the params teacher.* and text_queries, plus the teacher folder (teacher.model.dir).
Resume, shards, Ray: docs/teacher-embeddings.md, docs/cluster.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.teacher_cache import EmbeddingWriter, finalize, merge_shards, partial_path, shard_path
from pipeline.params import Params
from pipeline.paths import MELS
from pipeline.paths import TEACHER_CACHE as OUT
from pipeline.teacher.embed import RayTeacher, embed_block, ray_teacher, segment_batches
from pipeline.teacher.model import Teacher, load_teacher
from student_clap.spec import EMBED_DIM

log = logging.getLogger(__name__)

TEXT_BATCH = 64
LOG_EVERY_S = 30.0


def _digest(values: Sequence[object] | np.ndarray) -> str:
    data = np.asarray(values).tobytes() if isinstance(values, np.ndarray) else json.dumps(list(values)).encode()
    return hashlib.sha256(data).hexdigest()


def _embed_here(teacher: Teacher, mels, batches: list[tuple[int, int]], write) -> None:
    """The batches on this process's teacher; the next batch is read from HDF5 while the teacher runs."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(mels.teacher_mels, np.arange(*batches[0]))
        for i, (start, stop) in enumerate(batches):
            block = future.result()
            if i + 1 < len(batches):
                future = pool.submit(mels.teacher_mels, np.arange(*batches[i + 1]))
            write(start, stop, embed_block(teacher, block))


def embed_segments(teacher: Teacher | RayTeacher, mels, writer: EmbeddingWriter, rows: np.ndarray, batch_size: int) -> int:
    """Embed the still-missing `rows` of the mel cache into `writer`; returns how many were computed."""
    pending = writer.pending(rows)
    if len(pending) < len(rows):
        log.info("%d of %d segments already embedded by an earlier run", len(rows) - len(pending), len(rows))
    if len(pending) == 0:
        return 0
    batches = list(segment_batches(pending, batch_size))
    track_ids = list(mels.track_ids)
    seg_track = np.asarray(mels.segment_track)
    t0 = last_log = time.monotonic()
    done = 0
    with tqdm(total=len(pending), unit="seg", desc="teacher") as bar:

        def write(start: int, stop: int, result: tuple) -> None:
            nonlocal done, last_log
            emb, norms, first_bad = result
            if first_bad is not None:
                seg = start + first_bad
                raise RuntimeError(f"{getattr(mels, 'path', 'mel cache')}: segment {seg} of track "
                                   f"{track_ids[seg_track[seg]]} gives a non-finite or zero teacher embedding "
                                   "(corrupt mels?)")
            writer.write(start, emb, norms)
            done += stop - start
            bar.update(stop - start)
            now = time.monotonic()
            if now - last_log >= LOG_EVERY_S:
                rate = done / (now - t0)
                log.info(
                    "embedded %d/%d segments, %.1f seg/s, about %.0f s left",
                    done, len(pending), rate, (len(pending) - done) / max(rate, 1e-9),
                )
                last_log = now

        if isinstance(teacher, RayTeacher):
            teacher.embed_batches(lambda a, b: mels.teacher_mels(np.arange(a, b)), batches, write)
        else:
            _embed_here(teacher, mels, batches, write)
    elapsed = time.monotonic() - t0
    log.info("embedded %d segments in %.1f s (%.1f seg/s)", done, elapsed, done / max(elapsed, 1e-9))
    return done


def embed_query_sets(teacher: Teacher, sets: Mapping[str, Sequence[str]]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Embed every distinct query once, then hand each set its rows."""
    # Batches of similar length waste little compute on padding.
    unique = sorted(dict.fromkeys(q for queries in sets.values() for q in queries), key=lambda q: (len(q), q))
    rows = []
    for i in tqdm(range(0, len(unique), TEXT_BATCH), desc="text queries", unit="batch"):
        rows.append(teacher.embed_text(unique[i : i + TEXT_BATCH]).cpu().numpy())
    table = np.concatenate(rows) if rows else np.zeros((0, EMBED_DIM), np.float32)
    index = {q: i for i, q in enumerate(unique)}
    log.info("embedded %d distinct text queries in %d sets", len(unique), len(sets))
    return {name: (list(qs), table[np.array([index[q] for q in qs], dtype=np.int64)]) for name, qs in sets.items()}


def build_embeddings(
    teacher: Teacher | RayTeacher,
    mels,
    out: str | Path,
    query_sets: Mapping[str, Sequence[str]] | None,
    *,
    batch_size: int,
    params: Mapping[str, object],
    shard: tuple[int, int] | None = None,
) -> Path:
    """The stage's work on an open mel cache; returns the finished file (or the shard file)."""
    out = Path(out)
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(mels.attrs).items()}
    identity = {
        "format_version": 1,
        "teacher_sha256": teacher.sha256,
        "frontend_hash": str(mels.attrs.get("teacher_frontend_hash", "")),  # recorded by the mels stage
        # what makes two mel caches interchangeable for the teacher: attrs, track order, segment map
        "mels": {
            "n_segments": int(mels.n_segments),
            "track_ids_sha256": _digest(list(mels.track_ids)),
            "segment_track_sha256": _digest(np.asarray(mels.segment_track, dtype=np.int64)),
            "attrs": json.loads(json.dumps(attrs, sort_keys=True, default=str)),
        },
        "dtype": str(teacher.dtype).removeprefix("torch."),
    }
    extra = {"teacher_provenance": teacher.provenance, "params": params}
    path = partial_path(out) if shard is None else shard_path(out, *shard)
    writer = EmbeddingWriter(path, int(mels.n_segments), identity, extra)
    try:
        n = int(mels.n_segments)
        rows = np.arange(n) if shard is None else np.arange(shard[0] * n // shard[1], (shard[0] + 1) * n // shard[1])
        log.info("embedding %d segments of %d tracks into %s", len(rows), len(mels.track_ids), path)
        embed_segments(teacher, mels, writer, rows, batch_size)
        if query_sets is not None and (shard is None or shard[0] == 0):
            writer.write_text(embed_query_sets(teacher, query_sets))
        if shard is not None:
            writer.close()
            log.info("shard %d/%d done: %s (join with `student-clap teacher merge`)", shard[0], shard[1], path)
            return path
        ranges = [mels.track_segments(t) for t in mels.track_ids]
        return finalize(writer, out, list(mels.track_ids), ranges)
    finally:
        writer.close()


def run(params: Params, args: argparse.Namespace) -> int | None:
    from pipeline.data.mel_cache import MelCache
    from pipeline.data.queries import build_query_sets

    tp = params.teacher
    address = params.cluster.ray_address
    shard = getattr(args, "shard", None)
    query_sets = build_query_sets(params.text_queries) if shard is None or shard[0] == 0 else None
    recorded = {
        "teacher": {"batch_size": tp.batch_size, "cuda_batch_size": tp.cuda_batch_size, "device": tp.device,
                    "dtype": tp.dtype},
        "text_queries": asdict(params.text_queries),
    }
    # Scoped, not torch.set_grad_enabled(False): the stage also runs inside other processes (tests).
    with ExitStack() as stack:
        if address:  # cluster.ray_address: teacher actors on a Ray cluster, same batches, same bytes
            teacher = stack.enter_context(ray_teacher(address, tp.model.dir, tp.device, tp.dtype,
                                                      params.cluster.teacher_actors, params.cluster.teacher_cpus))
        else:
            teacher = load_teacher(tp.model.dir, device=tp.device, dtype=tp.dtype)
        batch_size = tp.cuda_batch_size if teacher.device.startswith("cuda") else tp.batch_size
        stack.enter_context(torch.no_grad())
        mels = stack.enter_context(MelCache(MELS))
        build_embeddings(teacher, mels, OUT, query_sets, batch_size=batch_size, params=recorded, shard=shard)
    return 0


def merge_main(args: argparse.Namespace) -> int:
    """`student-clap teacher merge SHARD... --out data/teacher.h5 [--mels data/mels.h5]`."""
    from pipeline.data.mel_cache import MelCache

    with MelCache(getattr(args, "mels", None) or MELS) as mels:
        ranges = [mels.track_segments(t) for t in mels.track_ids]
        merge_shards(args.inputs, args.out, list(mels.track_ids), ranges)
    return 0
