"""`student-clap` command line: argument parsing only; the work lives in the stage and tool modules."""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from student_clap.cli import add_commands as add_runtime_commands
from student_clap.cli import positive_int, with_models

# No pipeline.params import up here: it needs pyyaml, which the runtime-only install
# (`embed`, `index`, `search`, `similar`, `duplicates`, `publish`, from student_clap) does not have. Stage commands import it when they run.

log = logging.getLogger("student_clap")

# What the `pipeline` extra installs (import names): a command needing one of them says so.
PIPELINE_MODULES = frozenset({"torch", "transformers", "huggingface_hub", "safetensors", "h5py", "librosa", "yaml",
                              "dvc", "dvclive", "onnx", "matplotlib", "requests", "ruamel"})

STAGES = (
    "fetch_teacher",
    "fetch_weights",
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


def keep_freed_memory() -> None:
    """Let glibc keep freed tensor buffers for reuse instead of handing them back to the kernel.

    Torch frees and reallocates buffers of many MB every training step. With glibc's defaults, those
    over 32 MB are fresh mmaps and a freed heap top is trimmed, so the kernel faults in and zeroes the
    same memory again: 25 M page faults, about 15 % of the demo `dvc repro`'s CPU time
    (docs/benchmarks.md). Where memory lives changes no result."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): keep its defaults
        return
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc's <malloc.h>
    libc.mallopt(m_mmap_max, 0)  # every buffer from the heap, none mapped and unmapped on its own
    libc.mallopt(m_trim_threshold, 1 << 30)  # give heap memory back to the kernel only past 1 GiB free
    libc.mallopt(m_top_pad, 1 << 28)  # grow the heap 256 MiB at a time


def _stage_runner(args: argparse.Namespace) -> int | None:
    from pipeline.params import declared_params, load_params, restrict

    keep_freed_memory()
    declared = declared_params(Path(args.params).resolve().parent / "dvc.yaml", args.stage)
    params = load_params(args.params)
    if declared is not None:
        params = restrict(params, declared, args.stage)
    module = importlib.import_module(f"pipeline.stages.{args.stage}")
    return module.run(params, args)


def _stage_commands(sub: argparse._SubParsersAction) -> None:
    """The pipeline stages dvc.yaml runs, and `check`."""
    run = sub.add_parser("run", help="run one pipeline stage (dvc.yaml calls these)")
    run.add_argument("stage", choices=STAGES)
    run.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    run.add_argument("--shard", type=parse_shard, default=None, help="k/n: compute slice k of n (mels, teacher)")
    run.add_argument("--resume", action="store_true", help="continue training from the latest checkpoint")
    run.set_defaults(func=_stage_runner)

    check = sub.add_parser(
        "check",
        help="validate params and inputs (lists, audio roots, teacher files) without running a stage; "
        "run it before `dvc repro`, which deletes a stage's outputs before running it",
    )
    check.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    check.set_defaults(func=_call("pipeline.check", "main"))


def _data_commands(sub: argparse._SubParsersAction) -> None:
    """The demo, licence and mel-cache tools."""
    demo = sub.add_parser("demo", help="the embedded offline demo")
    demo_sub = demo.add_subparsers(dest="demo_command", required=True)
    synth = demo_sub.add_parser("synth", help="(re)generate the CC0 demo songs deterministically")
    synth.add_argument("--out", default="data/demo/audio", help="output folder (default: %(default)s)")
    synth.set_defaults(func=_call("pipeline.data.demo_audio", "main"))
    corpus = demo_sub.add_parser(
        "corpus", help="synthesise N labelled songs with MTG-Jamendo style lists (the fidelity benchmark's corpus)"
    )
    corpus.add_argument("--out", required=True, help="folder for audio/ and sources/")
    corpus.add_argument("--songs", type=positive_int, default=1000, help="number of songs (default: %(default)s)")
    corpus.add_argument("--seed", type=int, default=0, help="corpus seed (default: %(default)s)")
    corpus.add_argument("--min-seconds", type=float, default=15.0, help="shortest song (default: %(default)s)")
    corpus.add_argument("--max-seconds", type=float, default=30.0, help="longest song (default: %(default)s)")
    corpus.add_argument("--jobs", type=positive_int, default=1, help="songs rendered at once (default: %(default)s)")
    corpus.set_defaults(func=_call("pipeline.data.demo_audio", "corpus_main"))
    dteacher = demo_sub.add_parser(
        "teacher", help="train the demo teacher on synthetic clips and print its held-out zero-shot accuracy"
    )
    dteacher.add_argument("--params", default="params.yaml", help="teacher.model.demo settings (default: %(default)s)")
    dteacher.add_argument("--out", default=None, help="teacher folder (default: teacher.model.demo.weights_dir)")
    dteacher.set_defaults(func=_call("pipeline.teacher.demo", "main"))

    lic = sub.add_parser("licenses", help="licence tools")
    lic_sub = lic.add_subparsers(dest="licenses_command", required=True)
    audit = lic_sub.add_parser("audit", help="prove every cached track is in the manifest with an allowed licence")
    audit.add_argument("--manifest", default="data/manifest.jsonl")
    audit.add_argument("--mels", default="data/mels.h5")
    audit.add_argument("--teacher", default="data/teacher.h5")
    audit.add_argument("--json", dest="json_out", default=None, help="also write the summary as JSON here")
    audit.add_argument("--params", default="params.yaml", help="licence policy from ingest.policy here (default: %(default)s)")
    audit.set_defaults(func=_call("pipeline.data.audit", "main"))

    mels = sub.add_parser("mels", help="mel cache tools")
    mels_sub = mels.add_subparsers(dest="mels_command", required=True)
    merge = mels_sub.add_parser("merge", help="merge --shard k/n caches into one")
    merge.add_argument("inputs", nargs="+")
    merge.add_argument("--out", required=True)
    merge.set_defaults(func=_call("pipeline.data.mel_cache", "merge_main"))


def _teacher_commands(sub: argparse._SubParsersAction) -> None:
    """Teacher fetch, convert and merge."""
    teacher = sub.add_parser("teacher", help="teacher checkpoint tools")
    t_sub = teacher.add_subparsers(dest="teacher_command", required=True)
    fetch = t_sub.add_parser("fetch", help="download the LAION-CLAP checkpoint and roberta-base tokenizer")
    fetch.add_argument("--params", default="params.yaml")
    fetch.add_argument("--trust", action="store_true",
                       help="accept files whose sha256 is not pinned in params (or differs); recorded as trusted")
    fetch.set_defaults(func=_call("pipeline.teacher.fetch", "main"))
    conv = t_sub.add_parser("convert", help="LAION .pt checkpoint -> ClapModel safetensors + config + tokenizer")
    conv.add_argument("checkpoint")
    conv.add_argument("--tokenizer", required=True, help="folder with roberta-base tokenizer files")
    conv.add_argument("--out", required=True)
    conv.add_argument("--sha256", default=None, help="expected sha256 of CHECKPOINT (default: the published one for its name)")
    conv.add_argument(
        "--trust", action="store_true",
        help="accept a checkpoint with no sha256 to check (recorded in teacher.json; it is still never unpickled)",
    )
    conv.set_defaults(func=_call("pipeline.teacher.convert", "main"))
    tmerge = t_sub.add_parser("merge", help="join `run teacher --shard k/n` files into one teacher.h5")
    tmerge.add_argument("inputs", nargs="+")
    tmerge.add_argument("--out", default="data/teacher.h5")
    tmerge.add_argument("--mels", default="data/mels.h5", help="the mel cache the shards were made from")
    tmerge.set_defaults(func=_call("pipeline.stages.teacher", "merge_main"))


def _student_commands(sub: argparse._SubParsersAction) -> None:
    """Pretrained weights and training checkpoints."""
    weights = sub.add_parser("weights", help="EfficientAT pretrained weights")
    w_sub = weights.add_subparsers(dest="weights_command", required=True)
    wf = w_sub.add_parser(
        "fetch",
        help="download a released EfficientAT checkpoint (checked to load as that model's state dict; its "
        "sha256 is recorded beside it and enforced on later fetches)",
    )
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
        p.set_defaults(func=_call("pipeline.training.checkpoint", "main"))


def _report_commands(sub: argparse._SubParsersAction) -> None:
    """Compare, results and deps."""
    comp = sub.add_parser("compare", help="teacher vs exported student on any music folder: same-space figures, "
                                          "zero-shot, caption recall")
    comp.add_argument("folder", help="folder of songs (searched recursively)")
    comp.add_argument("--labels", default=None,
                      help="folder of label subfolders (GTZAN layout) or a CSV path,label: zero-shot accuracy")
    comp.add_argument("--captions", default=None, help="CSV path,caption (Song Describer layout): text-to-music recall")
    comp.add_argument("--json", default=None, help="also write the full report as JSON here")
    comp.add_argument("--prompt", default=None,
                      help="zero-shot prompt template with {label} (default: LAION's GTZAN prompt "
                           "'This audio is a {label} song.')")
    comp.add_argument("--models", default="models/export",
                      help="exported students: a folder or hf://OWNER/NAME[@REV] (default: %(default)s)")
    comp.add_argument("--teacher", default=None, help="teacher folder (default: teacher.model.dir of --params)")
    comp.add_argument("--params", default="params.yaml",
                      help="teacher front-end, teacher.model.dir and the same-space bar (default: %(default)s)")
    comp.add_argument("--device", default="cpu", help="teacher device: cpu, cuda or auto (default: %(default)s)")
    comp.add_argument("--batch-size", type=positive_int, default=16, help="windows per head call (default: %(default)s)")
    comp.add_argument("--threads", type=positive_int, default=None, help="onnxruntime threads (default: all cores)")
    comp.set_defaults(func=with_models(_call("pipeline.evaluation.compare", "main")))

    results = sub.add_parser("results", help="rewrite the results block of README.md from models/report/metrics.json")
    results.add_argument("--readme", default="README.md")
    results.add_argument("--metrics", default="models/report/metrics.json")
    results.add_argument("--check", action="store_true", help="exit 1 if the block is out of date instead of writing")
    results.set_defaults(func=_call("pipeline.evaluation.results", "main"))

    deps = sub.add_parser("deps", help="check that each stage's dvc.yaml deps cover the code it runs")
    deps.add_argument("--root", default=".")
    deps.add_argument("--write", action="store_true", help="rewrite the pipeline/ entries of every stage's deps from the code")
    deps.set_defaults(func=_call("pipeline.deps", "main"))


PIPELINE_COMMANDS = ("run", "check", "demo", "licenses", "mels", "teacher", "weights", "ckpt", "compare", "results", "deps")
EXTRA_HINT = "pip install 'student-clap[pipeline]' (from a checkout: pip install '.[pipeline]')"


def pipeline_installed() -> bool:
    """Whether the `pipeline` extra is installed (its heaviest packages can be found)."""
    for name in ("torch", "yaml", "h5py"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


def build_parser(pipeline: bool = True) -> argparse.ArgumentParser:
    """All commands; with `pipeline=False` (the runtime-only install) only the runtime commands (embed, index, search, similar, duplicates, publish),
    and a line saying what the others need."""
    parser = argparse.ArgumentParser(
        prog="student-clap",
        description="Distil LAION-CLAP into small ONNX audio and text students.",
        epilog=None if pipeline else f"This install has the runtime only. The pipeline commands "
                                     f"({', '.join(PIPELINE_COMMANDS)}) need: {EXTRA_HINT}",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    if not pipeline:
        add_runtime_commands(sub)
        return parser
    _stage_commands(sub)
    _data_commands(sub)
    _teacher_commands(sub)
    _student_commands(sub)
    add_runtime_commands(sub)
    _report_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    full = pipeline_installed()
    command = next((a for a in argv if not a.startswith("-")), None)
    if not full and command in PIPELINE_COMMANDS:
        print(f"student-clap {command}: needs the pipeline's dependencies, which this install does not have: "
              f"{EXTRA_HINT}; this install runs embed, index, search, similar, duplicates and publish", file=sys.stderr)
        return 3
    args = build_parser(full).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = args.func(args)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top in PIPELINE_MODULES:
            # the runtime-only install (`pip install student-clap`) has the runtime commands only
            log.error("`student-clap %s` needs the pipeline's dependencies (%s is not installed): %s; "
                      "this install runs embed, index, search, similar, duplicates and publish", args.command, top, EXTRA_HINT)
            return 3
        raise
    except Exception as exc:
        # These errors come from modules only the pipeline commands load (the runtime install has
        # neither yaml nor h5py), so they are looked up where raised instead of imported here.
        for module, name, status in (
            ("pipeline.params", "ParamsError", 2),
            ("pipeline.data.cache_files", "UnreadableCacheError", 1),  # a truncated mels.h5 / teacher.h5
        ):
            mod = sys.modules.get(module)
            if mod is not None and isinstance(exc, getattr(mod, name)):
                log.error("%s", exc)
                return status
        raise
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
