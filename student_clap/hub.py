"""Export bundles on the Hugging Face Hub: `--models hf://OWNER/NAME[@REV]` and `student-clap publish`.

    clap = StudentClap("hf://someone/student-clap-mn10")           # the newest commit of main
    clap = StudentClap("hf://someone/student-clap-mn10@3f2a9c0")   # a branch, tag or commit

A bundle is the folder the export stage writes: the ONNX files, tokenizer.json, student_clap.json,
the model card (README.md), licenses/ and SHA256SUMS, which lists every other file with its sha256.
SHA256SUMS is what both directions trust:

- `publish` refuses a folder whose SHA256SUMS, student_clap.json or card is missing, or where a
  listed file is missing, differs from its sha256 or is a link to outside the folder; it uploads
  exactly the listed files and SHA256SUMS, nothing else that lies in the folder;
- `resolve_models` downloads only the files SHA256SUMS lists (into the Hugging Face cache, so
  HF_HOME and HF_HUB_OFFLINE apply) and checks every one against it each time it is opened.

huggingface_hub is imported here only, and only when an hf:// address is used: a plain folder
never loads it.
"""

from __future__ import annotations

import glob
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from student_clap.files import sha256_file
from student_clap.spec import SPEC_FILE, SearchError, load_spec

log = logging.getLogger(__name__)

SCHEME = "hf://"
CHECKSUMS = "SHA256SUMS"
CARD = "README.md"
# The largest backbone (mn40_as, 46M parameters) exports about 0.7 GB: three fp32 copies of its
# weights (waveform, mel and song-head models) and two int8 ones. Three times that still stops a
# mistyped or hostile repo from filling the disk before a single file is checked.
MAX_BUNDLE_BYTES = 2 * 1024**3
MAX_CHECKSUMS_BYTES = 1024**2  # a bundle lists about twenty files; a larger list is not one of ours
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_ADDRESS = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^\s@]+))?")
_SUM_LINE = re.compile(r"(?P<sha>[0-9a-fA-F]{64}) [ *](?P<name>.+)")


class HubError(SearchError):
    """An hf:// address, a download or a bundle to publish cannot be used; the message names the repo or file."""


@dataclass(frozen=True)
class HubAddress:
    """`hf://OWNER/NAME[@REV]`: a model repo on the Hub and a branch, tag or commit (default main)."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision != "main" else "")


def is_hub_address(models: str | Path) -> bool:
    return isinstance(models, str) and models.startswith(SCHEME)


def parse_address(models: str) -> HubAddress:
    """`hf://OWNER/NAME[@REV]` -> HubAddress; HubError naming the address when it is not one."""
    match = _ADDRESS.fullmatch(models[len(SCHEME):]) if is_hub_address(models) else None
    if match is None or ".." in match["repo"] or (match["rev"] and ".." in match["rev"]):
        raise HubError(f"{models!r}: not a Hub address; expected hf://OWNER/NAME or hf://OWNER/NAME@REVISION "
                       "(a branch, tag or commit)")
    return HubAddress(match["repo"], match["rev"] or "main")


def resolve_models(models: str | Path) -> Path:
    """The local export folder for `models`: a plain path unchanged, or for hf://OWNER/NAME[@REV]
    the bundle downloaded into the Hugging Face cache and checked against its SHA256SUMS."""
    if not is_hub_address(models):
        return Path(models)
    return download_bundle(parse_address(str(models)))


# --------------------------------------------------------------------------- checking a bundle


def read_checksums(path: Path, where: str) -> dict[str, str]:
    """SHA256SUMS (`sha256sum` format) -> {relative posix name: sha256}; HubError naming the line
    that is not one, or a name that would leave the folder."""
    try:
        if path.stat().st_size > MAX_CHECKSUMS_BYTES:
            raise HubError(f"{where}: {CHECKSUMS} is larger than {MAX_CHECKSUMS_BYTES} bytes: not an export bundle's")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HubError(f"{where}: {CHECKSUMS} not found: not an export bundle (the export stage writes it; "
                       "`dvc repro export`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HubError(f"{where}: cannot read {CHECKSUMS} ({exc})") from None
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _SUM_LINE.fullmatch(line)
        name = match["name"] if match else ""
        parts = name.split("/")
        if (match is None or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)
                or name == CHECKSUMS or name in sums):
            raise HubError(f"{where}: {CHECKSUMS} line {n} is not '<sha256>  <relative path>' of a new file: {line[:120]!r}")
        sums[name] = match["sha"].lower()
    return sums


def spec_files(spec: dict[str, Any]) -> list[str]:
    """Every file student_clap.json names (ONNX models, tokenizer), for the students it has."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and value and (key == "file" or key.endswith("_file") or key == "tokenizer"):
                    names.append(value)
                else:
                    walk(value)

    walk({"audio": spec.get("audio") or {}, "text": spec.get("text") or {}})
    return sorted(set(names))


def check_bundle(folder: Path, where: str, *, links_inside: bool) -> dict[str, str]:
    """Check an export bundle in `folder` and return {name: sha256} of the files SHA256SUMS lists.

    Refused (HubError naming the file): no SHA256SUMS, student_clap.json or card; a file
    student_clap.json names that SHA256SUMS does not list; a listed file missing or of another
    sha256; more than MAX_BUNDLE_BYTES in all. `links_inside`: a listed file must not be a link that
    leads outside `folder` (a folder to publish; the Hub cache links every file to its blob store)."""
    sums = read_checksums(folder / CHECKSUMS, where)
    for required in (SPEC_FILE, CARD):
        if required not in sums:
            raise HubError(f"{where}: {CHECKSUMS} does not list {required}: not a complete export bundle")
    root = folder.resolve()
    total = 0
    for name in sums:  # the files first, so a link out is refused before anything reads it
        path = folder / name
        if links_inside and not path.resolve().is_relative_to(root):
            raise HubError(f"{where}: {name} is a link to {path.resolve()}, outside the bundle; copy the file in")
        if not path.is_file():
            raise HubError(f"{where}: {name} is listed in {CHECKSUMS} but missing")
        total += path.stat().st_size
        if total > MAX_BUNDLE_BYTES:
            raise HubError(f"{where}: more than {MAX_BUNDLE_BYTES // 1024**2} MiB in all; an export bundle is smaller")
    for name, expected in sums.items():  # before student_clap.json is parsed: nothing unchecked is read
        actual = sha256_file(folder / name)
        if actual != expected:
            raise HubError(f"{where}: {name} has sha256 {actual}, but {CHECKSUMS} says {expected}: the file was "
                           "changed or damaged after the export; refusing it")
    for name in spec_files(load_spec(folder)):
        if name not in sums:
            raise HubError(f"{where}: {SPEC_FILE} names {name} but {CHECKSUMS} does not list it: not a complete "
                           "export bundle")
    return sums


# --------------------------------------------------------------------------- download


def _hub():
    try:
        import huggingface_hub
    except ImportError:  # a base dependency, so only a hand-pruned environment gets here
        raise HubError("hf:// models need the huggingface_hub package: pip install huggingface_hub") from None
    return huggingface_hub


def download_bundle(address: HubAddress, *, endpoint: str | None = None, token: str | bool | None = None) -> Path:
    """The bundle at `address` in the Hugging Face cache (downloaded when online and not there yet),
    checked file by file against its SHA256SUMS. Offline (HF_HUB_OFFLINE=1, or the Hub unreachable)
    the cache alone answers."""
    hub = _hub()
    from huggingface_hub import errors

    try:
        folder = _download_online(hub, address, endpoint, token)
    except HubError:
        raise
    except errors.RepositoryNotFoundError:  # before HfHubHTTPError, its parent
        raise HubError(f"{address}: no such model repo on the Hub, or it is private and no token was given "
                       "(HF_TOKEN or `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{address}: the repo has no revision {address.revision!r}") from None
    except Exception as exc:  # offline mode, no route to the Hub, a time-out, a server error: the cache may hold it
        folder = _from_cache(hub, address, endpoint, exc)
        if isinstance(exc, errors.OfflineModeIsEnabled):
            log.info("%s: HF_HUB_OFFLINE=1, using the cached commit %s", address, folder.name)
        else:
            log.warning("%s: the Hub did not answer (%s); using the cached commit %s", address, exc, folder.name)
    check_bundle(folder, str(address), links_inside=False)
    return folder


def _download_online(hub: Any, address: HubAddress, endpoint: str | None, token: str | bool | None) -> Path:
    from huggingface_hub.hf_api import RepoFile

    api = hub.HfApi(endpoint=endpoint, token=token)
    commit = api.repo_info(address.repo_id, revision=address.revision).sha
    sizes = {f.path: f.size for f in api.list_repo_tree(address.repo_id, revision=commit, recursive=True)
             if isinstance(f, RepoFile)}
    if CHECKSUMS not in sizes:
        raise HubError(f"{address}: the repo has no {CHECKSUMS}: not a student-clap export bundle")
    if sizes[CHECKSUMS] > MAX_CHECKSUMS_BYTES:
        raise HubError(f"{address}: its {CHECKSUMS} is larger than {MAX_CHECKSUMS_BYTES} bytes: not an export bundle's")
    sums_path = Path(hub.hf_hub_download(address.repo_id, CHECKSUMS, revision=commit, endpoint=endpoint, token=token))
    names = read_checksums(sums_path, str(address))
    missing = sorted(set(names) - set(sizes))
    if missing:
        raise HubError(f"{address}: {CHECKSUMS} lists {missing[0]}, which the repo does not have at {commit[:12]}")
    total = sum(sizes[n] for n in names)
    if total > MAX_BUNDLE_BYTES:
        raise HubError(f"{address}: the bundle holds {total / 1024**2:.0f} MiB, more than the "
                       f"{MAX_BUNDLE_BYTES // 1024**2} MiB an export bundle can be; not downloading it")
    # the branch or tag name again (not the commit) so the cache records it for offline use
    folder = Path(hub.snapshot_download(address.repo_id, revision=address.revision, endpoint=endpoint, token=token,
                                        allow_patterns=[glob.escape(n) for n in (CHECKSUMS, *names)]))
    if folder.name != commit:
        raise HubError(f"{address}: {address.revision} moved from {commit[:12]} to {folder.name[:12]} while "
                       "downloading; run again")
    log.info("%s: commit %s in %s", address, commit, folder)
    return folder


def _from_cache(hub: Any, address: HubAddress, endpoint: str | None, why: Exception) -> Path:
    from huggingface_hub import errors

    try:
        return Path(hub.snapshot_download(address.repo_id, revision=address.revision, endpoint=endpoint,
                                          local_files_only=True, allow_patterns=[CHECKSUMS]))
    except errors.LocalEntryNotFoundError:
        offline = ("HF_HUB_OFFLINE=1" if isinstance(why, errors.OfflineModeIsEnabled)
                   else f"the Hub did not serve it ({type(why).__name__}: {why})")
        raise HubError(f"{address}: not in the Hugging Face cache ({hub.constants.HF_HUB_CACHE}) and {offline}; "
                       "run once with network access (HF_HUB_OFFLINE=0) to download it") from None


# --------------------------------------------------------------------------- publish


@dataclass(frozen=True)
class Published:
    url: str
    commit: str
    files: list[str]
    left_out: list[str]


def publish(folder: str | Path, repo_id: str, *, revision: str = "main", private: bool = False,
            token: str | None = None, endpoint: str | None = None, message: str | None = None) -> Published:
    """Check the export bundle in `folder` and commit exactly its listed files to the Hub model repo
    `repo_id` (created when missing) on branch `revision` (created from main when missing)."""
    folder = Path(folder)
    where = str(folder)
    if not folder.is_dir():
        raise HubError(f"{where}: no such folder; export the models first (`dvc repro export`) or pass --models")
    address = parse_address(f"{SCHEME}{repo_id}@{revision}")
    sums = check_bundle(folder, where, links_inside=True)
    files = sorted([CHECKSUMS, *sums])
    left_out = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p.relative_to(folder).as_posix() not in files)
    hub = _hub()
    from huggingface_hub import errors

    api = hub.HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(address.repo_id, private=private or None, exist_ok=True)
        if address.revision != "main":
            api.create_branch(address.repo_id, branch=address.revision, exist_ok=True)
        identity = load_spec(folder).get("model_identity") or "an unstamped export"
        info = api.upload_folder(
            repo_id=address.repo_id, folder_path=folder, revision=address.revision,
            allow_patterns=[glob.escape(n) for n in files],  # exactly the checked files, nothing else
            commit_message=message or f"Student CLAP export: {identity}"[:200],
        )
    except errors.HfHubHTTPError as exc:
        raise HubError(f"{repo_id}: the Hub refused the upload: {exc}") from None
    except Exception as exc:  # no route to the endpoint, a time-out, offline mode: say so without a traceback
        raise HubError(f"{repo_id}: cannot reach the Hub at {api.endpoint} ({type(exc).__name__}: {exc})") from None
    return Published(url=str(url), commit=info.oid, files=files, left_out=left_out)
