"""`student-clap weights fetch <name>`: get a released EfficientAT AudioSet checkpoint. No sha256 of the
release is pinned, so a first fetch must load as that model's state dict and records its sha256 in
``<file>.sha256`` for later fetches to match (docs/trust.md)."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from pipeline.data.download import download, sha256_file

log = logging.getLogger(__name__)

RELEASE_URL = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"

# Released AudioSet checkpoints of the mn family (asset names as published).
RELEASE_ASSETS: dict[str, str] = {
    "mn01_as": "mn01_as_mAP_298.pt",
    "mn02_as": "mn02_as_mAP_378.pt",
    "mn04_as": "mn04_as_mAP_432.pt",
    "mn05_as": "mn05_as_mAP_443.pt",
    "mn10_as": "mn10_as_mAP_471.pt",
    "mn20_as": "mn20_as_mAP_478.pt",
    "mn30_as": "mn30_as_mAP_482.pt",
    "mn40_as": "mn40_as_mAP_484.pt",
    "mn40_as_ext": "mn40_as_ext_mAP_487.pt",
}


class WeightsError(RuntimeError):
    pass


def asset_name(name: str) -> str:
    if name not in RELEASE_ASSETS:
        raise WeightsError(f"unknown EfficientAT model {name!r}; released: {', '.join(RELEASE_ASSETS)}")
    return RELEASE_ASSETS[name]


def check_release_file(path: Path, name: str) -> None:
    """Refuse a file that is not an EfficientAT `name` state dict (never unpickles objects)."""
    import torch

    from pipeline.models.efficientat import build_mobilenet

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises many types for junk, truncated or pickled files)
        raise WeightsError(f"{path}: not a loadable state dict ({str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    want = {k: tuple(v.shape) for k, v in build_mobilenet(name).state_dict().items() if k.startswith("features.")}
    got = {k: tuple(v.shape) for k, v in state.items() if k.startswith("features.")}
    if got != want:
        missing = sorted(set(want) - set(got))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise WeightsError(
            f"{path}: not an EfficientAT {name} checkpoint ({len(missing)} feature tensors missing, "
            f"{len(wrong)} of another shape{', e.g. ' + (missing + wrong)[0] if missing or wrong else ''})"
        )


def _record_sha(path: Path, digest: str) -> None:
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")


def fetch_weights(
    name: str,
    out_dir: str | Path = "models/pretrained",
    source: str | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Put the checkpoint of `name` into `out_dir` and return its path.

    `source`: None (the GitHub release), a base URL (``…/`` + asset name) or a local file. A digest
    recorded by an earlier fetch is enforced.
    """
    dest = Path(out_dir) / asset_name(name)  # what distill_audio.pretrained should point at
    dest.parent.mkdir(parents=True, exist_ok=True)
    side = dest.with_name(dest.name + ".sha256")
    expected = side.read_text().split()[0] if side.is_file() else None
    if dest.is_file():
        digest = sha256_file(dest)
        if expected is None or digest == expected:
            log.info("%s already present (sha256 %s)", dest, digest[:12])
            _record_sha(dest, digest)
            return dest
        log.warning("%s does not match its recorded sha256; fetching again", dest)
        dest.unlink()

    if source and not source.startswith(("http://", "https://")):
        src = Path(source)
        if not src.is_file():
            raise WeightsError(f"--from {source}: no such file")
        digest = sha256_file(src)
        if expected and digest != expected:
            raise WeightsError(f"{src}: sha256 {digest} does not match the expected {expected}")
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        _checked(tmp, name, expected)
        tmp.replace(dest)
        log.info("copied %s -> %s", src, dest)
    else:
        base = source or RELEASE_URL
        url = base.rstrip("/") + "/" + asset_name(name)
        log.info("downloading %s -> %s", url, dest)
        digest = download(url, dest, sha256=expected, timeout=60.0, progress=progress)
        _checked(dest, name, expected)
    _record_sha(dest, digest)
    log.info("%s ready (sha256 %s); set distill_audio.pretrained: %s", dest, digest, dest)
    return dest


def _checked(path: Path, name: str, expected: str | None) -> None:
    """Without a digest to trust, the file must at least be the right model's state dict."""
    if expected:
        return
    try:
        check_release_file(path, name)
    except WeightsError:
        path.unlink(missing_ok=True)
        raise


def main(args: argparse.Namespace) -> int:
    try:
        path = fetch_weights(args.name, args.out, args.source)
    except Exception as exc:  # DownloadError / WeightsError: one clear line, non-zero exit
        log.error("%s", exc)
        return 1
    print(path)
    return 0
