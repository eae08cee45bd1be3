"""`student-clap` command line: argument parsing only; the work lives in the stage and tool modules."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.params import ParamsError, declared_params, load_params, restrict

log = logging.getLogger("student_clap")

STAGES = (
    "ingest",
    "teacher_model",
    "mels",
    "teacher",
    "distill_audio",
    "distill_text",
    "evaluate",
    "export",
)


def parse_shard(text: str) -> tuple[int, int]:
    """`k/n` -> (k, n) with 0 <= k < n."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants k/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= k < n")
    return k, n


def _call(module: str, func: str) -> Callable[[argparse.Namespace], int | None]:
    """Import lazily so `student-clap embed` never pays for torch or dvc imports it does not use."""

    def runner(args: argparse.Namespace) -> int | None:
        return getattr(importlib.import_module(module), func)(args)

    return runner


def _stage_runner(args: argparse.Namespace) -> int | None:
    params = load_params(args.params)
    declared = declared_params(Path(args.params).resolve().parent / "dvc.yaml", args.stage)
    if declared is not None:
        params = restrict(params, declared, args.stage)
    module = importlib.import_module(f"pipeline.stages.{args.stage}")
    return module.run(params, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="student-clap",
        description="Distil LAION-CLAP into small ONNX audio and text students.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    # ---- pipeline stages (what dvc.yaml runs)
    run = sub.add_parser("run", help="run one pipeline stage (dvc.yaml calls these)")
    run.add_argument("stage", choices=STAGES)
    run.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    run.add_argument("--shard", type=parse_shard, default=None, help="k/n: compute slice k of n (mels, teacher)")
    run.add_argument("--resume", action="store_true", help="continue training from the latest checkpoint")
    run.set_defaults(func=_stage_runner)

    # ---- data tools
    demo = sub.add_parser("demo", help="the embedded offline demo")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    synth = demo_sub.add_parser("synth", help="(re)generate the CC0 demo songs deterministically")
    synth.add_argument("--out", default="data/demo/audio", help="output folder (default: %(default)s)")
    synth.set_defaults(func=_call("pipeline.demo_audio", "main"))
    dteacher = demo_sub.add_parser(
        "teacher", help="train the demo teacher on synthetic clips and print its held-out zero-shot accuracy"
    )
    dteacher.add_argument("--params", default="params.yaml", help="teacher.model.demo settings (default: %(default)s)")
    dteacher.add_argument("--out", default=None, help="teacher folder (default: teacher.model.demo.weights_dir)")
    dteacher.set_defaults(func=_call("pipeline.teacher_demo", "main"))

    lic = sub.add_parser("licenses", help="licence tools")
    lic_sub = lic.add_subparsers(dest="licenses_command", required=True)
    audit = lic_sub.add_parser("audit", help="prove every cached track is in the manifest with an allowed licence")
    audit.add_argument("--manifest", default="data/manifest.jsonl")
    audit.add_argument("--mels", default="data/mels.h5")
    audit.add_argument("--teacher", default="data/teacher.h5")
    audit.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON here")
    audit.add_argument("--params", default="params.yaml", help="licence policy from ingest.policy here (default: %(default)s)")
    audit.set_defaults(func=_call("pipeline.audit", "main"))

    mels = sub.add_parser("mels", help="mel cache tools")
    mels_sub = mels.add_subparsers(dest="mels_command", required=True)
    merge = mels_sub.add_parser("merge", help="merge --shard k/n caches into one")
    merge.add_argument("inputs", nargs="+")
    merge.add_argument("--out", required=True)
    merge.set_defaults(func=_call("pipeline.store", "merge_main"))

    # ---- teacher tools
    teacher = sub.add_parser("teacher", help="teacher checkpoint tools")
    t_sub = teacher.add_subparsers(dest="teacher_command", required=True)
    fetch = t_sub.add_parser("fetch", help="download the LAION-CLAP checkpoint and roberta-base tokenizer")
    fetch.add_argument("--params", default="params.yaml")
    fetch.set_defaults(func=_call("pipeline.teacher_fetch", "main"))
    conv = t_sub.add_parser("convert", help="LAION .pt checkpoint -> ClapModel safetensors + config + tokenizer")
    conv.add_argument("checkpoint")
    conv.add_argument("--tokenizer", required=True, help="folder with roberta-base tokenizer files")
    conv.add_argument("--out", required=True)
    conv.set_defaults(func=_call("pipeline.teacher_convert", "main"))
    tmerge = t_sub.add_parser("merge", help="join `run teacher --shard k/n` files into one teacher.h5")
    tmerge.add_argument("inputs", nargs="+")
    tmerge.add_argument("--out", default="data/teacher.h5")
    tmerge.add_argument("--mels", default="data/mels.h5", help="the mel cache the shards were made from")
    tmerge.set_defaults(func=_call("pipeline.stages.teacher", "merge_main"))

    # ---- student tools
    weights = sub.add_parser("weights", help="EfficientAT pretrained weights")
    w_sub = weights.add_subparsers(dest="weights_command", required=True)
    wf = w_sub.add_parser("fetch", help="download a released EfficientAT checkpoint (sha256 checked)")
    wf.add_argument("name", help="e.g. mn10_as")
    wf.add_argument("--out", default="models/pretrained")
    wf.add_argument("--from", dest="source", default=None, help="local file or base URL instead of the release")
    wf.set_defaults(func=_call("pipeline.models.weights", "main"))

    ckpt = sub.add_parser("ckpt", help="inspect and edit training checkpoints")
    c_sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    c_ls = c_sub.add_parser("ls", help="epochs with train/validation cosine and learning rate")
    c_ls.add_argument("dir", nargs="?", default="models/audio/checkpoints")
    c_show = c_sub.add_parser("show", help="config and parameter count of a checkpoint")
    c_show.add_argument("path")
    c_reset = c_sub.add_parser("reset", help="reset learning rate, optimizer or scheduler state")
    c_reset.add_argument("path")
    c_reset.add_argument("--lr", type=float, default=None)
    c_reset.add_argument("--optimizer", action="store_true")
    c_reset.add_argument("--scheduler", action="store_true")
    for p in (c_ls, c_show, c_reset):
        p.set_defaults(func=_call("pipeline.checkpoints", "main"))

    # ---- use the exported models (onnxruntime only)
    embed = sub.add_parser("embed", help="embed audio files with the exported ONNX student")
    embed.add_argument("files", nargs="+")
    embed.add_argument("--out", required=True, help=".npz (paths + vectors), .npy (+ .paths.txt) or .jsonl output")
    embed.add_argument("--models", default="models/export")
    embed.set_defaults(func=_call("pipeline.search", "embed_main"))

    index = sub.add_parser("index", help="embed a folder of songs into a search index")
    index.add_argument("dir")
    index.add_argument("--out", required=True, help="index file (.npz)")
    index.add_argument("--models", default="models/export")
    index.set_defaults(func=_call("pipeline.search", "index_main"))
    for p in (embed, index):
        p.add_argument("--batch-size", type=int, default=8, help="10-s segments per ONNX call (default: %(default)s)")
        p.add_argument("--int8", action="store_true", help="use the int8-quantised audio model")

    search = sub.add_parser("search", help="text-to-music search over an index")
    search.add_argument("query")
    search.add_argument("--index", required=True)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--models", default="models/export")
    search.set_defaults(func=_call("pipeline.search", "search_main"))
    for p in (embed, index, search):
        p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")

    results = sub.add_parser("results", help="rewrite the results block of README.md from models/report/metrics.json")
    results.add_argument("--readme", default="README.md")
    results.add_argument("--metrics", default="models/report/metrics.json")
    results.add_argument("--check", action="store_true", help="exit 1 if the block is out of date instead of writing")
    results.set_defaults(func=_call("pipeline.results", "main"))

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = args.func(args)
    except ParamsError as exc:
        log.error("%s", exc)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
