"""Robust HTTP downloads: resume, bounded retries with backoff, sha256 check, atomic rename.

`<dest>.part` files, `Range` resumes and the refusals that are never retried: docs/trust.md, "Downloads".
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3
from tqdm import tqdm

from student_clap.files import sha256_file

log = logging.getLogger(__name__)

USER_AGENT = "student-clap/0.1 (dataset ingest; https://pypi.org/project/student-clap/)"
CHUNK_BYTES = 1 << 16
# Client errors that may succeed later; every other 4xx is final.
_RETRYABLE_4XX = {408, 425, 429}
_MAX_RETRY_AFTER = 60.0
MAX_REDIRECTS = 10
# The largest file this project fetches is the 2.35 GB LAION checkpoint; callers that know the
# size pass it (expected_size), ingest passes ingest.downloads.max_megabytes.
DEFAULT_MAX_BYTES = 4 << 30
_HTML_START = (b"<!doctype html", b"<html", b"<head", b"<!--")


class DownloadError(RuntimeError):
    """A file could not be fetched or failed verification. Names the URL and the destination."""

    def __init__(self, url: str, dest: Path | str, reason: str) -> None:
        super().__init__(f"download of {url} -> {dest} failed: {reason}")
        self.url = url
        self.dest = Path(dest)
        self.reason = reason


class _Refused(Exception):
    """Internal: a permanent refusal; the partial file is removed and nothing is retried."""


class _Retryable(Exception):
    """Internal: this attempt failed in a way a later attempt may fix."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    try:
        return min(float(value), _MAX_RETRY_AFTER)
    except ValueError:
        return None


def _content_range(resp: requests.Response) -> tuple[int | None, int | None]:
    """(first byte, total length) from a Content-Range header; None where absent or '*'."""
    m = re.match(r"bytes\s+(\d+|\*)(?:-\d+)?/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if not m:
        return None, None
    start = None if m.group(1) == "*" else int(m.group(1))
    total = None if m.group(2) == "*" else int(m.group(2))
    return start, total


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """Body bytes as they arrive. `read1` hands over every byte received before a connection
    drops (a buffered read discards them), so a truncated transfer resumes where it broke off."""
    raw = resp.raw
    if not hasattr(raw, "read1"):  # urllib3 < 2
        yield from resp.iter_content(CHUNK_BYTES)
        return
    while chunk := raw.read1(CHUNK_BYTES, decode_content=False):
        yield chunk


def _looks_like_html(resp: requests.Response, first: bytes) -> bool:
    ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    return ctype in ("text/html", "application/xhtml+xml") or first.lstrip()[:16].lower().startswith(_HTML_START)


def _get(session: requests.Session, url: str, offset: int, timeout: float) -> requests.Response:
    """Send the GET (from byte `offset`); network failures become _Retryable, bad redirects _Refused."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.TooManyRedirects as exc:
        raise _Refused(f"more than {MAX_REDIRECTS} redirects (a redirect loop?)") from exc
    except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema, requests.exceptions.InvalidURL) as exc:
        raise _Refused(f"redirected to a URL that is not http(s): {exc}") from exc
    except requests.Timeout as exc:
        raise _Retryable(f"no answer within {timeout:g} s ({type(exc).__name__})") from exc
    except requests.RequestException as exc:
        raise _Retryable(f"connection failed: {exc}") from exc


def _plan_body(resp: requests.Response, url: str, dest: Path, part: Path, offset: int) -> tuple[int, str, int | None] | None:
    """From the status: (offset to write from, file mode, total bytes or None), or None when the
    partial file is already complete. Raises _Retryable or DownloadError."""
    status = resp.status_code
    if status == 416 and offset:
        # Nothing left to send: either the .part is already complete or it is longer than
        # the file (stale from another version) and must be restarted.
        _, total = _content_range(resp)
        if total == offset:
            return None
        part.unlink(missing_ok=True)
        raise _Retryable(f"stale partial file ({offset} bytes) rejected by the server", wait=0.0)
    if status in _RETRYABLE_4XX or status >= 500:
        raise _Retryable(f"HTTP {status}", wait=_retry_after(resp))
    if status >= 400:
        raise DownloadError(url, dest, f"HTTP {status} {resp.reason or ''}".strip())
    if status not in (200, 206):
        raise _Retryable(f"unexpected HTTP {status}")
    if status == 206:
        start, total = _content_range(resp)
        if start != offset:
            part.unlink(missing_ok=True)
            raise _Retryable(f"server resumed at byte {start}, expected {offset}", wait=0.0)
        return offset, "ab", total
    if offset:
        log.info("%s ignores Range requests; restarting from the first byte", url)
    length = resp.headers.get("Content-Length")
    return 0, "wb", int(length) if length and length.isdigit() else None


def _write_body(
    resp: requests.Response, url: str, dest: Path, part: Path, plan: tuple[int, str, int | None],
    timeout: float, progress: bool, max_bytes: int,
) -> None:
    """Stream the body into `part`, refusing HTML and anything past the cap."""
    offset, mode, total = plan
    if total is not None and total > max_bytes:
        raise _Refused(f"the server announces {total} bytes, more than the cap of {max_bytes}")
    received = offset
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
               desc=dest.name[:40], disable=not progress, leave=False)
    try:
        with open(part, mode) as fh:
            for chunk in _chunks(resp):
                if received == 0 and _looks_like_html(resp, chunk):
                    raise _Refused("the server sent an HTML page, not the file (an error or login page?)")
                if received + len(chunk) > max_bytes:
                    raise _Refused(f"the body exceeds the cap of {max_bytes} bytes; stopped there")
                fh.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except (requests.Timeout, urllib3.exceptions.TimeoutError) as exc:
        raise _Retryable(f"transfer stalled for {timeout:g} s at byte {received}") from exc
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:  # broken or stalled
        raise _Retryable(f"transfer broke off at byte {received}: {exc}") from exc
    except OSError as exc:  # the local disk, not the network
        raise DownloadError(url, dest, f"cannot write {part}: {exc}") from exc
    finally:
        bar.close()
    if total is not None and received < total:
        raise _Retryable(f"transfer ended at byte {received} of {total}")


def _attempt(
    session: requests.Session, url: str, dest: Path, part: Path, timeout: float, progress: bool, max_bytes: int
) -> None:
    """One GET into `part`, continuing where it stopped. Raises _Retryable, _Refused or DownloadError."""
    offset = part.stat().st_size if part.exists() else 0
    with _get(session, url, offset, timeout) as resp:
        plan = _plan_body(resp, url, dest, part, offset)
        if plan is not None:
            _write_body(resp, url, dest, part, plan, timeout, progress, max_bytes)


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    *,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
    session: requests.Session | None = None,
    max_bytes: int | None = None,
    expected_size: int | None = None,
) -> str:
    """Fetch `url` into `dest` and return the file's hex sha256.

    At most `max_bytes` are accepted (default: `expected_size` when known, else DEFAULT_MAX_BYTES);
    with `expected_size`, a file of any other size is refused.

    An existing `dest` whose hash matches (or any existing `dest` when no hash is given) is kept
    as it is. `retries` extra attempts follow a network error, timeout, 5xx, 408 or 429, waiting
    `backoff * 2**k` seconds (or the server's Retry-After); other 4xx answers fail at once.
    Raises `DownloadError` naming the URL and the file.
    """
    dest = Path(dest)
    expected = sha256.lower() if sha256 else None
    if dest.exists():
        digest = sha256_file(dest)
        if expected is None or digest == expected:
            log.debug("%s already present", dest)
            return digest
        log.warning("%s exists but its sha256 %s is not the expected %s; fetching again", dest, digest, expected)
        dest.unlink()

    cap = max_bytes or expected_size or DEFAULT_MAX_BYTES
    part = part_path(dest)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise DownloadError(url, dest, f"only http(s) URLs are fetched, not {scheme or 'a URL without scheme'!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    own_session = session is None
    session = session or requests.Session()
    session.max_redirects = MAX_REDIRECTS
    try:
        for attempt in range(retries + 1):
            try:
                _attempt(session, url, dest, part, timeout, progress, cap)
                break
            except _Refused as exc:
                part.unlink(missing_ok=True)
                raise DownloadError(url, dest, str(exc)) from None
            except _Retryable as exc:
                if attempt >= retries:
                    raise DownloadError(url, dest, f"{exc} (gave up after {attempt + 1} attempts)") from exc
                wait = exc.wait if exc.wait is not None else backoff * (2**attempt)
                log.warning("%s: %s; attempt %d of %d in %.1f s", url, exc, attempt + 2, retries + 1, wait)
                time.sleep(wait)
    finally:
        if own_session:
            session.close()

    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink(missing_ok=True)
        raise DownloadError(url, dest, f"{size} bytes arrived, expected {expected_size}")
    digest = sha256_file(part)
    if expected is not None and digest != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(url, dest, f"sha256 {digest} does not match the expected {expected}")
    os.replace(part, dest)
    log.debug("fetched %s -> %s (%s)", url, dest, digest)
    return digest


@dataclass(frozen=True)
class DownloadJob:
    url: str
    dest: Path
    sha256: str | None = None


@dataclass
class DownloadResult:
    job: DownloadJob
    sha256: str | None = None  # set on success
    error: str | None = None  # set on failure

    @property
    def ok(self) -> bool:
        return self.error is None


def download_many(
    jobs: Iterable[DownloadJob | tuple], concurrency: int = 4, *, progress: bool = True, **options: Any
) -> list[DownloadResult]:
    """Run several downloads, at most `concurrency` at a time; one failure never stops the rest.

    `jobs` holds `DownloadJob`s or `(url, dest[, sha256])` tuples; `options` (retries, backoff, timeout,
    max_bytes) go to each `download`. Results come back in job order.
    """
    todo: Sequence[DownloadJob] = [j if isinstance(j, DownloadJob) else DownloadJob(j[0], Path(j[1]), *j[2:]) for j in jobs]
    results = [DownloadResult(job) for job in todo]
    if not todo:
        return results
    local = threading.local()
    sessions: list[requests.Session] = []

    def one(i: int) -> None:
        if not hasattr(local, "session"):  # one connection pool per worker thread
            local.session = requests.Session()
            sessions.append(local.session)
        job = todo[i]
        try:
            results[i].sha256 = download(
                job.url, Path(job.dest), job.sha256,
                progress=progress and concurrency == 1, session=local.session, **options,
            )
        except DownloadError as exc:
            results[i].error = str(exc)
            log.error("%s", exc)

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="download") as pool:
        futures = [pool.submit(one, i) for i in range(len(todo))]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="downloads", unit="file", disable=not progress):
            fut.result()
    for session in sessions:
        session.close()
    failed = sum(not r.ok for r in results)
    log.info("downloaded %d of %d files (%d failed)", len(results) - failed, len(results), failed)
    return results
