"""Text student vs the teacher's text tower: per-query CPU latency and parameter counts.

The student is exported to ONNX and timed with onnxruntime. The teacher tower is the CLAP
text encoder at its real size (RoBERTa-base: 12 layers, hidden 768, 50 265-token vocabulary,
plus CLAP's two-layer 512-d projection) with random weights: speed does not depend on the
weights. It is timed in PyTorch and, for a like-for-like figure, in onnxruntime too, on the
query's own length and padded to 77 tokens as LAION-CLAP tokenises.

    python benchmarks/text.py                       # default params, random student weights
    python benchmarks/text.py --student models/text/student.pt --tokenizer models/text/tokenizer.json

Targets: the student at least 50x faster per query and with at least 100x fewer parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_clap.song import onnx_session  # noqa: E402

QUERY = "energetic rock with electric guitar and drums"


def _time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of one call, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def student_model(args: argparse.Namespace):
    from dataclasses import asdict

    from pipeline.models.text_student import build_text_student, load_text_student
    from pipeline.params import load_params

    if args.student:
        return load_text_student(args.student)
    return build_text_student(asdict(load_params(ROOT / "params.yaml").distill_text.model)).eval()


def student_inputs(model, args: argparse.Namespace) -> dict[str, np.ndarray]:
    if args.tokenizer:
        from student_clap.tokenizer import encode, load_tokenizer

        ids, mask = encode(load_tokenizer(args.tokenizer, vocab_size=model.config.vocab_size), [QUERY], model.config.max_length)
    else:  # about one token per word plus <s> and </s>
        n = min(len(QUERY.split()) + 2, model.config.max_length)
        ids = np.random.default_rng(0).integers(4, model.config.vocab_size, size=(1, n)).astype(np.int64)
        mask = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask}


def teacher_tower() -> torch.nn.Module:
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    from pipeline.teacher.model import roberta_base_text_config

    torch.manual_seed(0)
    cfg = ClapTextConfig(**roberta_base_text_config(), projection_dim=512)
    return ClapTextModelWithProjection(cfg).eval()


class TeacherEmbed(torch.nn.Module):
    """input_ids, attention_mask -> text_embeds, a plain module for timing and export."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tower(input_ids=input_ids, attention_mask=attention_mask).text_embeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default=None, help="trained student.pt (default: random weights at params.yaml size)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json for the student (default: random ids)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--teacher-tokens", type=int, default=12, help="query length in teacher tokens (unpadded)")
    parser.add_argument("--no-teacher-onnx", action="store_true", help="skip exporting the 500 MB teacher tower to ONNX")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipeline.models.text_student import export_text_onnx

    torch.set_num_threads(args.threads)
    results: dict[str, object] = {"threads": args.threads, "query": QUERY}
    with tempfile.TemporaryDirectory() as tmp:
        # ---- student
        student = student_model(args)
        feeds = student_inputs(student, args)
        path = export_text_onnx(student, Path(tmp) / "text_student.onnx")
        results["student_parameters"] = student.count_parameters()
        results["student_tokens"] = int(feeds["input_ids"].shape[1])
        # Each model at its best thread count: one thread suits the tiny student (as `student-clap
        # search` runs it), the full budget suits RoBERTa.
        for threads in sorted({1, args.threads}):
            sess = onnx_session(path, threads)
            results[f"student_onnx_{threads}t_ms"] = _time(lambda: sess.run(None, feeds), args.repeats * 10)
        best = min(sorted({1, args.threads}), key=lambda t: results[f"student_onnx_{t}t_ms"])
        results["student_threads"] = best
        results["student_onnx_ms"] = results[f"student_onnx_{best}t_ms"]
        results["student_onnx_mb"] = path.stat().st_size / 1e6

        # ---- teacher tower
        tower = TeacherEmbed(teacher_tower())
        results["teacher_parameters"] = sum(p.numel() for p in tower.parameters())
        teacher_feeds = {}
        for label, n in (("query", args.teacher_tokens), ("padded77", 77)):
            ids = torch.randint(3, 50265, (1, n))
            ids[0, 0], ids[0, -1] = 0, 2
            mask = torch.ones_like(ids)
            teacher_feeds[label] = (ids, mask)
            with torch.inference_mode():
                results[f"teacher_torch_{label}_ms"] = _time(lambda: tower(ids, mask), args.repeats)
        if not args.no_teacher_onnx:
            tpath = Path(tmp) / "teacher_text.onnx"
            with torch.no_grad():
                torch.onnx.export(
                    tower, teacher_feeds["query"], str(tpath), input_names=["input_ids", "attention_mask"],
                    output_names=["embedding"], opset_version=17, dynamo=False,
                    dynamic_axes={"input_ids": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "l"}},
                )
            tsess = onnx_session(tpath, args.threads)
            for label, (ids, mask) in teacher_feeds.items():
                tf = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                results[f"teacher_onnx_{label}_ms"] = _time(lambda: tsess.run(None, tf), args.repeats)

    s = results["student_onnx_ms"]
    results["parameter_ratio"] = results["teacher_parameters"] / results["student_parameters"]
    for key in [k for k in list(results) if k.startswith("teacher_") and k.endswith("_ms")]:  # teacher on --threads
        results["speedup_vs_" + key[len("teacher_"):-3]] = results[key] / s

    print(f"CPU, {args.threads} threads, one query ({QUERY!r})")
    print(f"  student  {results['student_parameters']:>12,} parameters  ONNX {s:8.3f} ms/query "
          f"on {results['student_threads']} thread(s) ({results['student_tokens']} tokens, "
          f"{results['student_onnx_mb']:.1f} MB); " + ", ".join(
              f"{k.split('_')[2]}: {v:.3f} ms" for k, v in results.items() if k.startswith("student_onnx_") and k.endswith("t_ms")))
    print(f"  teacher  {results['teacher_parameters']:>12,} parameters  (RoBERTa-base + CLAP projection)")
    for key in sorted(k for k in results if k.startswith("teacher_") and k.endswith("_ms")):
        label = key[len("teacher_"):-3]
        print(f"    {label:<18} {results[key]:9.2f} ms/query   student is {results['speedup_vs_' + label]:7.1f}x faster")
    print(f"  parameters: student has {results['parameter_ratio']:.0f}x fewer")
    worst = min(v for k, v in results.items() if k.startswith("speedup_vs_"))
    print(f"  targets: >= 50x faster (worst case here {worst:.1f}x), >= 100x fewer parameters "
          f"({results['parameter_ratio']:.0f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
