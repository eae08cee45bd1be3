"""Run laion_clap 1.1.7 offline in this process: make a random checkpoint and embed with it.

    python run_laion.py CACHE_DIR WORK_DIR [--seed N]

Reads WORK_DIR/waves.npy (float32 [n, 480000] at 48 kHz) and WORK_DIR/texts.json, and writes
WORK_DIR/laion_ckpt.pt (a randomly initialised CLAP_Module(amodel='HTSAT-base') saved the way
LAION's training saves it: a dict with `state_dict`, keys prefixed `module.`, with the text
position ids) and WORK_DIR/laion.npz (audio and text embeddings from load_ckpt + laion's API).
Also WORK_DIR/laion_keys.txt: every state_dict key and shape, one per line.
It is a separate process because the Hugging Face cache location is fixed when huggingface_hub
is first imported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for laion_oracle
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for pipeline


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("work")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)

    from laion_oracle import hf_cache

    hf_cache.activate(args.cache)
    import numpy as np
    import torch

    import laion_clap

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(args.seed)
    source = laion_clap.CLAP_Module(enable_fusion=False, amodel="HTSAT-base", device="cpu")
    state = {f"module.{k}": v for k, v in source.model.state_dict().items()}
    # Released checkpoints carry the text position ids (older transformers kept them in the
    # state dict) and laion's load_ckpt deletes that key, so add it when this transformers omits it.
    pos_key = "module.text_branch.embeddings.position_ids"
    if pos_key not in state:
        state[pos_key] = source.model.text_branch.embeddings.position_ids.clone()
    ckpt = work / "laion_ckpt.pt"
    torch.save({"epoch": 15, "state_dict": state}, ckpt)
    (work / "laion_keys.txt").write_text("".join(f"{k} {list(v.shape)}\n" for k, v in state.items()))
    del source

    torch.manual_seed(args.seed + 1)  # a different init, so the weights below come from the file
    model = laion_clap.CLAP_Module(enable_fusion=False, amodel="HTSAT-base", device="cpu")
    model.load_ckpt(str(ckpt), verbose=False)
    waves = np.load(work / "waves.npy")
    texts = json.loads((work / "texts.json").read_text())
    with torch.no_grad():
        audio = model.get_audio_embedding_from_data(waves, use_tensor=False)
        text = model.get_text_embedding(texts, use_tensor=False)
    np.savez(work / "laion.npz", audio=np.asarray(audio), text=np.asarray(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
