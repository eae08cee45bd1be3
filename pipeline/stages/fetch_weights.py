"""Stage fetch_weights: EfficientAT pretrained weights into models/pretrained/ (DVC-tracked) when used.

distill_audio.pretrained empty (the demo) fetches nothing and needs no network. Otherwise the
released checkpoint of distill_audio.model is fetched (sha256 recorded beside it), or a file
placed there by hand is taken as it is; dvc.lock then records its hash. Reads only
distill_audio.model and distill_audio.pretrained.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.models.weights import fetch_stage
from pipeline.params import Params
from pipeline.paths import PRETRAINED

log = logging.getLogger(__name__)


def run(params: Params, args: argparse.Namespace) -> int | None:
    p = params.distill_audio
    try:
        fetch_stage(p.model, p.pretrained, PRETRAINED)
    except Exception as exc:  # WeightsError / DownloadError: one clear line, non-zero exit
        log.error("%s", exc)
        return 1
    return 0
