"""The runtime's numpy log-mel (student_clap.logmel) against the torch front-end it mirrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.frontends import StudentMel
from student_clap.logmel import KIND, LogMel
from repo_params import section

pytest.importorskip("scipy.fft", reason="the numpy front-end needs scipy.fft")


def _spec(**change) -> dict:
    import dataclasses

    return {"kind": KIND, **dataclasses.asdict(section("frontend.student", **change))}


@pytest.mark.parametrize("n", [6400, 32000 * 3 + 17, 320 * 700])  # an edge excerpt, an odd length, 700 frames
def test_logmel_equals_the_torch_front_end(n):
    rng = np.random.default_rng(n)
    # music-like levels: a loud part, a quiet part (where log(x + 1e-5) is most sensitive) and silence
    wave = np.concatenate([rng.uniform(-0.6, 0.6, n // 2), 1e-3 * rng.standard_normal(n // 4), np.zeros(n - n // 2 - n // 4)])
    waves = np.stack([wave, wave[::-1]]).astype(np.float32)
    with torch.no_grad():
        want = StudentMel(section("frontend.student")).eval()(torch.from_numpy(waves)).numpy()
    got = LogMel.from_spec(_spec())(waves)
    assert got.shape == want.shape == (2, 128, 1 + (n - 1) // 320)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


def test_logmel_follows_its_parameters():
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 32000)).astype(np.float32)
    p = section("frontend.student", n_mels=64, hop_length=160, preemphasis=0.9, f_max=8000.0)
    with torch.no_grad():
        want = StudentMel(p).eval()(torch.from_numpy(wave)).numpy()
    got = LogMel.from_spec(_spec(n_mels=64, hop_length=160, preemphasis=0.9, f_max=8000.0))(wave)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


def test_logmel_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="kind"):
        LogMel.from_spec({**_spec(), "kind": "clap_htsat"})
    with pytest.raises(KeyError):
        LogMel.from_spec({k: v for k, v in _spec().items() if k != "hop_length"})
    with pytest.raises(ValueError, match="win_length"):
        LogMel.from_spec(_spec(win_length=2048))
    with pytest.raises(ValueError, match="too few"):
        LogMel.from_spec(_spec())(np.zeros((1, 400), np.float32))
