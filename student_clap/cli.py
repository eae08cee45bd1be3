"""`student-clap embed | index | search | similar | duplicates | publish`: the runtime's commands (also `python -m student_clap`).

pipeline.cli adds these to the pipeline's commands under the one `student-clap` console script.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("student_clap")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Embed, index and search with the exported models (onnxruntime only)."""
    embed = sub.add_parser("embed", help="embed audio files with the exported ONNX student")
    embed.add_argument("files", nargs="+")
    embed.add_argument("--out", required=True,
                       help=".npz (paths + vectors), .npy (+ .paths.jsonl naming its rows) or .jsonl output")
    embed.set_defaults(func=embed_main)

    index = sub.add_parser("index", help="embed a folder of songs into a search index (SQLite; kill-safe, incremental)")
    index.add_argument("dir")
    index.add_argument("--out", required=True,
                       help="the index file (e.g. music.db): created, or updated (only new or changed files are "
                            "embedded); x.npz/x.npy/x.jsonl: the index is kept as x.db and exported to that file")
    index.set_defaults(func=index_main)
    for p in (embed, index):
        p.add_argument("--jobs", type=positive_int, default=None,
                       help="songs embedded at once, each on one onnxruntime thread unless --threads "
                            "(default: one per CPU core)")
        p.add_argument("--batch-size", type=positive_int, default=16, help="windows per head call (default: %(default)s)")

    search = sub.add_parser("search", help="text-to-music search over an index")
    search.add_argument("query")
    search.add_argument("--index", required=True, help="an index file (`index --out`) or its .npz export")
    search.add_argument("-k", type=positive_int, default=10)
    search.add_argument("--force", action="store_true",
                        help="search an index built by another audio model than --models' (scores may mean nothing)")
    search.set_defaults(func=search_main)

    similar = sub.add_parser("similar", help="songs like one song (from its stored vector; a file not in the index "
                                             "is embedded first)")
    similar.add_argument("song")
    similar.add_argument("--index", required=True, help="an index file (`index --out`) or its .npz export")
    similar.add_argument("-k", type=positive_int, default=10, help="songs listed, the song itself first")
    similar.set_defaults(func=similar_main)

    dup = sub.add_parser("duplicates", help="groups of probable copies of one recording; `duplicates calibrate` "
                                            "measures the threshold on copies of your own songs")
    dup.add_argument("action", nargs="?", choices=["calibrate"], help="measure and store the threshold")
    dup.add_argument("--index", required=True, help="an index file (`index --out`)")
    dup.add_argument("--threshold", type=float, default=None,
                     help="centred cosine at or above which two songs are copies (default: the calibrated one)")
    dup.add_argument("--songs", type=positive_int, default=20, help="calibrate: songs to make copies of")
    dup.set_defaults(func=duplicates_main)
    for p in (embed, index, search, similar, dup):
        p.add_argument("--models", default="models/export",
                       help="the export folder, or hf://OWNER/NAME[@REVISION] for one published on the Hugging Face "
                            "Hub (downloaded into its cache, checked against its SHA256SUMS) (default: %(default)s)")
        p.add_argument("--threads", type=positive_int, default=None, help="onnxruntime threads (default: all cores)")
        p.set_defaults(func=with_models(p.get_default("func")))

    publish = sub.add_parser("publish", help="push an export folder (models, card, SHA256SUMS) to a Hugging Face Hub "
                                             "model repo; others then use --models hf://REPO")
    publish.add_argument("repo", help="OWNER/NAME of the model repo (created when missing)")
    publish.add_argument("--models", default="models/export", help="the export folder (default: %(default)s)")
    publish.add_argument("--revision", default="main", help="branch to commit to (created from main when missing; "
                                                            "default: %(default)s)")
    publish.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                                                                "its visibility)")
    publish.add_argument("--token", default=None, help="Hub access token with write access (default: HF_TOKEN or the "
                                                       "token `hf auth login` saved)")
    publish.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    publish.add_argument("--message", default=None, help="commit message (default: names the model identity)")
    publish.set_defaults(func=publish_main)


def _quiet_http() -> None:
    """huggingface_hub's HTTP client logs every request at INFO; the commands say what matters."""
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def with_models(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run` with args.models resolved to a local folder first: hf://OWNER/NAME[@REV] is downloaded
    (or found in the cache) and checked; a folder is passed on unchanged."""

    def resolved(args: argparse.Namespace) -> int:
        from student_clap.hub import resolve_models
        from student_clap.spec import SearchError

        _quiet_http()
        try:
            args.models = str(resolve_models(args.models))
        except SearchError as exc:
            log.error("%s", exc)
            return 2
        return run(args)

    return resolved


def publish_main(args: argparse.Namespace) -> int:
    from student_clap.hub import HubError, publish

    _quiet_http()
    try:
        done = publish(args.models, args.repo, revision=args.revision, private=args.private, token=args.token,
                       endpoint=args.endpoint, message=args.message)
    except HubError as exc:
        log.error("%s", exc)
        return 2
    if done.left_out:
        print(f"not uploaded (not in SHA256SUMS): {', '.join(done.left_out)}", file=sys.stderr)
    print(f"published {len(done.files)} files to {done.url}")
    print(f"commit {done.commit}")
    print(f"use: --models hf://{args.repo}@{done.commit}   (or hf://{args.repo}"
          f"{'' if args.revision == 'main' else '@' + args.revision} for the newest)")
    return 0


def _audio(args: argparse.Namespace, jobs: int):
    """The song-level embedder. With several songs at once each runs on one onnxruntime thread
    unless --threads says otherwise: the cores then work on different songs, which scales better."""
    from student_clap.embed import open_audio_embedder

    return open_audio_embedder(args.models, batch_size=getattr(args, "batch_size", 16), threads=args.threads or (1 if jobs > 1 else None))


def embed_main(args: argparse.Namespace) -> int:
    from student_clap.embed import embed_files, song_jobs
    from student_clap.library import check_export_target, report_lines, write_export
    from student_clap.spec import SearchError

    try:
        out = Path(args.out)
        check_export_target(out)
        jobs = song_jobs(args.jobs, len(args.files))
        embedder = _audio(args, jobs)
        result = embed_files(embedder, args.files, jobs=jobs)
        write_export(out, result, embedder.model_id, embedder.model_identity)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    for line in report_lines(result.failed, [(p, n) for p, n in zip(result.paths, result.notes) if n]):
        print(line, file=sys.stderr)
    log.info("wrote %d embeddings to %s", len(result.paths), out)
    return 0 if result.paths else 1


def index_main(args: argparse.Namespace) -> int:
    from student_clap.embed import scan_audio, song_jobs
    from student_clap.index import check_index_target, read_index
    from student_clap.library import build_index, check_export_target, check_writable, index_paths, report_lines, write_export
    from student_clap.spec import SearchError, text_identity

    try:
        db, export = index_paths(args.out)
        check_writable(db)
        check_index_target(db)
        if export is not None:
            check_export_target(export)
        n_files = len(scan_audio(args.dir).files)
        jobs = song_jobs(args.jobs, n_files)
        embedder = _audio(args, jobs)
        try:
            text_model = text_identity(args.models)
        except SearchError:
            text_model = ""
        report = build_index(embedder, args.dir, db, text_model=text_model, jobs=jobs, progress=True)
        if export is not None:
            index = read_index(db)
            write_export(export, index, index.audio_model, index.model_identity)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    for line in report.scan.summary():
        print(f"left out: {line}", file=sys.stderr)
    for line in report_lines(report.failed, report.notes):
        print(line, file=sys.stderr)
    log.info("index %s: %d songs: reused %d, embedded %d, removed %d; %d file(s) skipped%s", db, report.songs,
             report.reused, report.embedded, report.removed, len(report.failed),
             f"; exported to {export}" if export is not None else "")
    return 0 if report.songs else 1


def search_main(args: argparse.Namespace) -> int:
    # only what a text query needs: no decoders, resamplers or audio model (student_clap.query)
    from student_clap.ann import ANN_MIN_SONGS, search_ann
    from student_clap.identity import check_index_model
    from student_clap.index import read_index, read_index_head, search
    from student_clap.query import TextEmbedder, check_query
    from student_clap.spec import SearchError

    def embed(text: str):
        # one query per process: onnxruntime's graph optimisation would cost more than it saves
        return TextEmbedder(args.models, threads=args.threads, optimize=False).embed([text])

    try:
        text = check_query(args.query)
        head = read_index_head(args.index)
        query = None
        if head is not None and head[1] >= ANN_MIN_SONGS:
            # a large library: checked from its meta, searched through the approximate index
            index = head[0]
            query = embed(text)
            if query.shape[1] == index.dim:
                check_index_model(index, args.models, force=args.force)
                found = search_ann(args.index, query, args.k)
                if found is not None:
                    return _print_hits(found[0], args.models)
        index = read_index(args.index, details=False)
        if not index.paths:
            raise SearchError(f"{args.index}: the index has no songs yet")
        if query is None:
            query = embed(text)
        if query.shape[1] != index.dim:
            raise SearchError(f"{args.index} holds {index.dim}-d vectors but the text model in {args.models} gives "
                              f"{query.shape[1]}-d ones: it was built for other models (--force cannot help); "
                              "re-index with these models")
        check_index_model(index, args.models, force=args.force)
        hits = search(index, query, args.k)[0]
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    return _print_hits(hits, args.models)


def _print_hits(hits, models: str) -> int:
    from student_clap.files import printable

    _demo_note(models)
    for rank, (path, score) in enumerate(hits, start=1):
        print(f"{rank:3d}  {score:+.5f}  {printable(path)}")
    return 0


def _checked_index(args: argparse.Namespace):
    from student_clap.index import read_index
    from student_clap.library import check_index_model
    from student_clap.spec import SearchError

    index = read_index(args.index)
    if not index.paths:
        raise SearchError(f"{args.index}: the index has no songs yet")
    check_index_model(index, args.models, forceable=False)
    return index


def similar_main(args: argparse.Namespace) -> int:
    from student_clap.embed import printable
    from student_clap.spec import SearchError
    from student_clap.tools import similar

    try:
        index = _checked_index(args)
        hits = similar(index, args.song, args.k, embed=lambda p: _audio(args, 1).embed_track(p).vector)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    for rank, (path, score) in enumerate(hits, start=1):
        print(f"{rank:3d}  {score:+.5f}  {printable(path)}")
    return 0


def duplicates_main(args: argparse.Namespace) -> int:
    from student_clap.embed import printable
    from student_clap.spec import SearchError
    from student_clap.tools import calibrate, duplicate_groups, store_calibration, stored_threshold

    try:
        index = _checked_index(args)
        if args.action == "calibrate":
            embedder = _audio(args, 1)
            cal = calibrate(index, lambda p: embedder.embed_track(p).vector, songs=args.songs)
            store_calibration(args.index, cal)
            for line in cal.lines():
                print(line)
            print(f"stored in {args.index}; `student-clap duplicates --index {args.index}` uses it")
            return 0
        stored = stored_threshold(index)
        if args.threshold is None and stored is None:
            raise SearchError(f"{args.index}: no duplicate threshold stored; run `student-clap duplicates calibrate "
                              f"--index {args.index}` first, or pass --threshold")
        threshold = args.threshold if args.threshold is not None else stored[0]
        groups = duplicate_groups(index, threshold, stored[1] if stored else None)
    except SearchError as exc:
        log.error("%s", exc)
        return 2
    for n, group in enumerate(groups, start=1):
        print(f"group {n} ({len(group)} songs)")
        for path, score in group:
            print(f"  {score:+.5f}  {printable(path)}")
    print(f"{len(groups)} group(s) at cosine >= {threshold:.5f}", file=sys.stderr)
    return 0


def _demo_note(models: str) -> None:
    """Say once, on stderr, when the students were distilled from a demo teacher."""
    from student_clap.identity import teacher_note

    note = teacher_note(models)
    if note:
        print(note, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="student-clap", description="Music search with the exported students.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
