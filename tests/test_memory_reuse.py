"""Every stage process keeps freed buffers for reuse (pipeline.cli.keep_freed_memory)."""

from __future__ import annotations

import argparse
import ctypes.util
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") != "libc.so.6",
                                reason="mallopt settings are glibc's (Linux); other C libraries keep their defaults")

# Allocate and free a 40 MB buffer 40 times (as torch does with activations every step) and count
# the page faults the kernel served meanwhile.
CHURN = textwrap.dedent("""
    import json, resource, sys
    import torch
    if sys.argv[1] == "keep":
        from pipeline.cli import keep_freed_memory
        keep_freed_memory()
    torch.ones(10_000_000).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        torch.ones(10_000_000).sum()
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    # glibc's default maps each buffer over 32 MB afresh: ~10 000 pages faulted in per allocation
    assert default > 40 * 8000, default
    assert kept < default / 10, (kept, default)


def test_stage_runner_sets_it_up(monkeypatch, tmp_path):
    import pipeline.cli as cli
    from pipeline.params import ParamsError

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    (tmp_path / "params.yaml").write_text("audio: {}\n")  # refused by the typed view, after the set-up
    with pytest.raises(ParamsError, match="missing key"):
        cli._stage_runner(argparse.Namespace(params=str(tmp_path / "params.yaml"), stage="ingest"))
    assert calls == [True]
