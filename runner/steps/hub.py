"""The Hugging Face hub: a model's or dataset's revision resolved to a commit, and its files fetched into the
normal Hugging Face cache (`HF_HOME`) through huggingface_hub: resumable, with its progress bars.

A revision resolves from the cache first (a cached ref needs no request), else, unless `HF_HUB_OFFLINE` is set,
from the hub (one request). `apply --locked` resolves from the lock's pins instead, so another machine fetches
exactly the locked commit or fails saying why. A model is fetched as safetensors weights, config and tokenizer
files only; a dataset source names its files in the URL convention huggingface_hub's HfFileSystem, DuckDB and
pandas share: `hf://datasets/ORG/NAME[@REVISION]/FILE-or-glob`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
from pathlib import Path
from urllib.parse import unquote

MODEL_FILES = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
DATASET_URL = re.compile(r"hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^/]+))?/(?P<path>.+)")


class HubError(Exception):
    """A repo, revision or file the hub (or the cache, offline) cannot give; the message says what to do."""


def offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def pin_name(kind: str, repo: str, revision: str) -> str:
    """How a lock names one resolution: `model:ORG/NAME@REVISION`."""
    return f"{kind}:{repo}@{revision}"


def folder(kind: str, repo: str) -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE) / f"{kind}s--{repo.replace('/', '--')}"


def cached_commit(repo: str, revision: str, kind: str = "model") -> str | None:
    """The commit a cached revision points at, read from the cache layout (no request)."""
    root = folder(kind, repo)
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision if (root / "snapshots" / revision).is_dir() else None
    try:
        commit = (root / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return commit if (root / "snapshots" / commit).is_dir() else None


def resolve(repo: str, revision: str, kind: str = "model", pins: dict[str, str] | None = None) -> str | None:
    """The commit `revision` names: the lock's pin, else the cache's, else the hub's; None when offline or the hub
    cannot be reached and the cache does not know it."""
    pinned = (pins or {}).get(pin_name(kind, repo, revision))
    if pinned:
        return pinned
    commit = cached_commit(repo, revision, kind)
    if commit or offline():
        return commit
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        commit = HfApi().repo_info(repo, revision=revision, repo_type=kind).sha
    except GatedRepoError:
        raise HubError(
            f"{kind} {repo} is gated on the hub: accept its terms on its page and log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{kind} {repo} has no revision {revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise HubError(f"there is no {kind} {repo} on the hub (or it is private: log in, or set HF_TOKEN)") from None
    except Exception:  # no network, a proxy, a hub that is down: the cache is all there is
        return None
    if commit and commit != revision:  # the cache's ref, as huggingface_hub writes it: next time, no request
        refs = folder(kind, repo) / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / revision).write_text(commit)
    return commit


def complete(snapshot: Path) -> bool:
    """Whether a model snapshot holds a config and all its safetensors weights (an interrupted download does not)."""
    if not (snapshot / "config.json").is_file():
        return False
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((snapshot / s).is_file() for s in shards)
    return any(snapshot.glob("*.safetensors"))


def fetch_model(repo: str, commit: str) -> Path:
    """The model's snapshot at `commit`, downloaded into the cache if it is not complete there."""
    snapshot = folder("model", repo) / "snapshots" / commit
    if complete(snapshot):
        return snapshot
    if offline():
        raise HubError(missing_message("model", repo, commit, "HF_HUB_OFFLINE is set"))
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, revision=commit, allow_patterns=MODEL_FILES))
    except Exception as exc:  # the hub unreachable, the commit gone, a disk full: say which
        raise HubError(missing_message("model", repo, commit, _first_line(exc))) from None
    if not complete(path):
        raise HubError(
            f"model {repo} at {commit[:12]} has no safetensors weights; runner loads weights only from safetensors "
            "(pickled .bin weights are refused): pick a revision that has them, or convert them"
        )
    return path


def dataset_path(url: str, pins: dict[str, str] | None = None) -> tuple[Path, str, str]:
    """The local file (or directory of the files a glob names) for an `hf://datasets/...` URL, fetched into the
    cache if needed: (path, the pin's name, its commit)."""
    m = DATASET_URL.fullmatch(url)
    if m is None:
        raise HubError(f"{url!r} is not a hub dataset URL: write hf://datasets/ORG/NAME[@REVISION]/FILE-or-glob")
    repo, revision, pattern = m["repo"], unquote(m["rev"] or "main"), m["path"]
    if ".." in pattern.split("/"):
        raise HubError(f"{url!r} climbs out of the dataset with '..': name a file or glob inside it")
    commit = resolve(repo, revision, "dataset", pins)
    if commit is None:
        why = "HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached"
        raise HubError(missing_message("dataset", repo, revision, why))
    snapshot = folder("dataset", repo) / "snapshots" / commit
    globbed = any(c in pattern for c in "*?[")
    # what a glob matched at this commit (immutable), kept beside the cache's refs: no listing the next time
    memo = folder("dataset", repo) / "runner-globs" / commit / hashlib.sha256(pattern.encode()).hexdigest()[:16]
    try:
        known = [snapshot / f for f in json.loads(memo.read_text())] if globbed else [snapshot / pattern]
    except (OSError, ValueError):
        known = []
    if not known or not all(p.is_file() for p in known):
        if offline():
            raise HubError(missing_message("dataset", repo, revision, "HF_HUB_OFFLINE is set"))
        from huggingface_hub import snapshot_download

        try:
            snapshot = Path(snapshot_download(repo, repo_type="dataset", revision=commit, allow_patterns=[pattern]))
        except Exception as exc:
            raise HubError(missing_message("dataset", repo, revision, _first_line(exc))) from None
        known = [
            p for p in snapshot.rglob("*") if p.is_file() and fnmatch.fnmatch(str(p.relative_to(snapshot)), pattern)
        ]
        if globbed and known:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(json.dumps(sorted(str(p.relative_to(snapshot)) for p in known)))
    found = sorted(known)
    name = pin_name("dataset", repo, revision)
    if not found:
        raise HubError(f"no file of dataset {repo} at {commit[:12]} matches {pattern!r}")
    if not globbed:
        return found[0], name, commit
    parent = found[0].parent
    if any(p.parent != parent for p in found) or sorted(p for p in parent.iterdir() if p.is_file()) != found:
        raise HubError(
            f"{pattern!r} must name the files of one directory of dataset {repo} (a source reads a directory's "
            f"files); it matches {len(found)} files, e.g. {[str(p.relative_to(snapshot)) for p in found[:3]]}"
        )
    return parent, name, commit


def missing_message(kind: str, repo: str, revision: str, why: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (
        f"{kind} {repo} (revision {revision}) is not in the Hugging Face cache ({HF_HUB_CACHE}) and could not be "
        f"downloaded: {why}. Online, runner downloads it; or run `hf download {repo} --revision {revision}"
        f"{' --repo-type dataset' if kind == 'dataset' else ''}` where there is a network and copy the cache here "
        "(or set HF_HOME to it)"
    )


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
