"""A stand-in for the Hugging Face hub on 127.0.0.1, for huggingface_hub pointed at it with HF_ENDPOINT.

It answers the calls a download makes, as the hub's API does: revision info (`/api/{models,datasets}/REPO/revision/
REV`: the commit and the files), the tree listing (`/api/.../tree/COMMIT`), and `resolve` (HEAD and GET, with
`X-Repo-Commit`, an `ETag` and ranges, so an interrupted download resumes). Unknown repos, revisions and files get
the hub's 404s with its `X-Error-Code`. Every request is recorded, so a test can say what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    """One repo: its branches and tags (`refs`, name -> commit) and each commit's files (a directory)."""

    refs: dict[str, str]
    commits: dict[str, Path]


@dataclass
class Hub:
    repos: dict[tuple[str, str], Repo] = field(default_factory=dict)  # (models | datasets, ORG/NAME) -> Repo
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    url: str = ""

    def add(self, kind: str, name: str, files: Path, *, commit: str | None = None, ref: str = "main") -> str:
        """Serve directory `files` as commit `commit` (by default a hash of its contents) of `ref`."""
        digest = hashlib.sha1()
        for f in sorted(p for p in files.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(files)).encode() + b"\0" + f.read_bytes())
        commit = commit or digest.hexdigest()
        repo = self.repos.setdefault((kind, name), Repo({}, {}))
        repo.refs[ref] = commit
        repo.commits[commit] = files
        return commit

    def downloads(self) -> list[str]:
        """The paths of the files whose bytes were sent (GET on resolve)."""
        return [
            p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in self.requests if m == "GET" and "/resolve/" in p
        ]


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _fail(self, code: int, error: str) -> None:
        self.send_response(code)
        self.send_header("X-Error-Code", error)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, value: object, commit: str | None = None) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        self.wfile.write(data)

    def _find(self, kind: str, name: str, revision: str) -> tuple[Repo, str] | None:
        repo = self.hub.repos.get((kind, name))
        if repo is None:
            self._fail(404, "RepoNotFound")
            return None
        commit = repo.refs.get(revision, revision)
        if commit not in repo.commits:
            self._fail(404, "RevisionNotFound")
            return None
        return repo, commit

    def _answer(self, body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((self.command, path))
        api = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/(.*))?", path)
        if api:
            kind, name, what, revision, _ = api.groups()
            found = self._find(kind, name, revision)
            if found is None:
                return
            repo, commit = found
            files = sorted(p for p in repo.commits[commit].rglob("*") if p.is_file())
            rel = [str(p.relative_to(repo.commits[commit])) for p in files]
            if what == "revision":
                self._json({"id": name, "sha": commit, "siblings": [{"rfilename": r} for r in rel]}, commit)
            else:
                entries = [
                    {"type": "file", "path": r, "size": p.stat().st_size, "oid": _etag(p)[:40]}
                    for r, p in zip(rel, files, strict=True)
                ]
                self._json(entries, commit)
            return
        resolve = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not resolve:
            self._fail(404, "RepoNotFound")
            return
        dataset, name, revision, rel_path = resolve.groups()
        found = self._find("datasets" if dataset else "models", name, revision)
        if found is None:
            return
        repo, commit = found
        file = repo.commits[commit] / rel_path
        if not file.is_file():
            self._fail(404, "EntryNotFound")
            return
        data = file.read_bytes()
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if ranged and body:
            start = int(ranged.group(1))
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{_etag(file)}"')
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if body:
            self.wfile.write(data[start:])


@contextmanager
def serve(hub: Hub) -> Iterator[Hub]:
    """The hub answering on 127.0.0.1 (its address in `hub.url`) while the block runs."""
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
