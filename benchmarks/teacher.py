"""Teacher throughput: HTSAT-base (random weights) segments per second on cached 10-s log-mels.

    python benchmarks/teacher.py                      # CPU, 2 threads, batch 1 and 8
    python benchmarks/teacher.py --device cuda --batches 1 8 32 --dtype fp32 bf16

Prints one line per (device, dtype, batch): segments/s and ms per segment. The audio tower is
what the teacher stage spends its time on; the text tower is kept minimal here.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.teacher.model import Teacher, clap_config, htsat_base_audio_config, roberta_base_text_config


def build(device: str, dtype: torch.dtype) -> Teacher:
    from transformers import ClapModel

    text = roberta_base_text_config(vocab_size=300)
    text.update(num_hidden_layers=1, hidden_size=64, num_attention_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    model = ClapModel(clap_config(htsat_base_audio_config(), text)).eval().to(device=device, dtype=dtype)
    return Teacher(model=model, tokenizer=None, device=device, dtype=dtype, sha256="", provenance={})


def measure(teacher: Teacher, batch: int, min_seconds: float, device: str) -> float:
    mels = torch.randn(batch, 1001, 64) * 15 - 40
    teacher.embed_mels(mels)  # warm-up (allocations, kernels)
    n, start = 0, time.perf_counter()
    while True:
        teacher.embed_mels(mels)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n += batch
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and n >= 2 * batch:
            return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--min-seconds", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"HTSAT-base teacher, random weights, {where}, torch {torch.__version__}")
    for name in args.dtype:
        dtype = torch.bfloat16 if name == "bf16" else torch.float32
        teacher = build(args.device, dtype)
        for batch in args.batches:
            rate = measure(teacher, batch, args.min_seconds, args.device)
            print(f"{args.device:5s} {name:4s} batch {batch:3d}: {rate:8.2f} segments/s  {1000 / rate:8.1f} ms/segment")


if __name__ == "__main__":
    main()
