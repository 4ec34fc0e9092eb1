"""A shared artifact cache on any fsspec filesystem: `s3://bucket/prefix`, `gs://…`, `az://…`,
`file:///path` or a plain directory on a shared disk, the way DVC remotes work.

Layout under the remote's root::

    blobs/<hash[:2]>/<hash>      file contents, by BLAKE3 hash (immutable: same name, same bytes)
    artifacts/<key>.json         an artifact's manifest: its files' hashes, sizes and output hash
    tmp/                         uploads in progress

A push uploads every blob first (each to `tmp/` and then moved to its name, so no name ever
holds half a file) and the manifest last: a push cut off anywhere leaves no manifest, so nothing
usable. Two pushes of one key are safe: each manifest names blobs that are all there. A pull
downloads into a local temp dir and checks every file's size and hash against the manifest
before the cache takes it. Credentials come from the filesystem's own configuration (the AWS
environment and profiles for s3, and so on); they are never part of a URL runner prints.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

from stores.errors import StoreError
from stores.hashing import canonical_json, hash_file_uncached


class RemoteError(StoreError):
    """The remote cannot be used (missing, not writable, a library absent); the message says what to do."""


def redact(url: str) -> str:
    """A URL as it may be printed: without user:password@."""
    return re.sub(r"(?<=://)[^/@]*@", "", url)


class Remote:
    def __init__(self, url: str) -> None:
        import fsspec

        self.url = redact(str(url))
        try:
            self.fs, self.root = fsspec.core.url_to_fs(str(url))
        except ImportError as exc:
            raise RemoteError(
                f"the cache remote {self.url} needs a library that is not installed ({exc}); "
                "for s3:// install `runner[s3]` (s3fs), for gs:// gcsfs, for az:// adlfs"
            ) from None
        except (ValueError, OSError) as exc:
            raise RemoteError(f"the cache remote {self.url} cannot be opened ({exc})") from None
        self.root = self.root.rstrip("/")
        local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        # on an object store a prefix exists once something is under it: the bucket is what must exist
        must_exist = self.root if local else self.root.split("/", 1)[0]
        try:
            ok = self.fs.isdir(must_exist)
        except Exception as exc:  # botocore, aiohttp, OS errors: all mean the same to the user
            raise RemoteError(f"the cache remote {self.url} cannot be reached ({type(exc).__name__}: {exc})") from None
        if not ok:
            what = "directory" if local else "bucket"
            raise RemoteError(
                f"the cache remote {self.url}: the {what} {must_exist} does not exist; create it "
                "first (runner never creates a remote, so a typo cannot start a new empty cache)"
            )

    def _blob(self, digest: str) -> str:
        return f"{self.root}/blobs/{digest[:2]}/{digest}"

    def _manifest(self, key: str) -> str:
        return f"{self.root}/artifacts/{key}.json"

    def read_manifest(self, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self.fs.cat_file(self._manifest(key)))
        except FileNotFoundError:
            return None
        except ValueError:
            return None
        except Exception as exc:
            raise RemoteError(
                f"reading {key[:12]} from the cache remote {self.url} failed ({type(exc).__name__}: {exc})"
            ) from None
        return value if isinstance(value, dict) and value.get("key") == key else None

    def _put(self, local: Path | None, data: bytes | None, dest: str) -> None:
        """Upload to tmp/, then move into place: `dest` never holds part of a file."""
        tmp = f"{self.root}/tmp/{secrets.token_hex(8)}"
        try:
            for d in (f"{self.root}/tmp", dest.rsplit("/", 1)[0]):  # object stores have no directories: a no-op there
                self.fs.makedirs(d, exist_ok=True)
            if local is not None:
                self.fs.put_file(str(local), tmp)
            else:
                self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, dest)
        except Exception as exc:
            try:
                self.fs.rm_file(tmp)
            except Exception:  # best effort: a stale tmp upload is harmless
                pass
            raise RemoteError(
                f"writing to the cache remote {self.url} failed ({type(exc).__name__}: {exc}); "
                "the local build is intact, push again later"
            ) from None

    def push(self, path: Path, manifest: dict[str, Any]) -> bool:
        """Upload the artifact in directory `path` unless the remote has it. True if uploaded."""
        key = manifest["key"]
        if self.read_manifest(key) is not None:
            return False
        for rel, meta in sorted(manifest.get("files", {}).items()):
            dest = self._blob(meta["hash"])
            try:
                present = self.fs.exists(dest) and self.fs.size(dest) == meta["size"]
            except Exception:  # unknown: upload again
                present = False
            if not present:
                self._put(path / "data" / rel, None, dest)
        self._put(None, canonical_json(manifest).encode(), self._manifest(key))
        return True

    def fetch(self, key: str, dest: Path) -> dict[str, Any] | str:
        """Download `key` into the directory `dest` (files under `dest/data`, verified). Returns its manifest,
        or why it cannot be used."""
        manifest = self.read_manifest(key)
        if manifest is None:
            return "not in the shared cache"
        for rel, meta in sorted(manifest.get("files", {}).items()):
            local = dest / "data" / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._blob(meta["hash"]), str(local))
            except FileNotFoundError:
                return f"{rel}: its blob is missing from the shared cache"
            except Exception as exc:
                raise RemoteError(
                    f"downloading {key[:12]} from {self.url} failed ({type(exc).__name__}: {exc})"
                ) from None
            if local.stat().st_size != meta["size"] or hash_file_uncached(local) != meta["hash"]:
                return f"{rel}: the shared copy does not match its manifest (tampered or damaged)"
        return manifest
