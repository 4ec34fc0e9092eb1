"""Where steps run: in this process (the default), or, for the data steps that can, on a Ray cluster
(`--executor ray[://ADDRESS]`, the recipe's `data.executor`). The executor is never part of a key.

A step that can run on a cluster registers a `sharded` function beside its `run` (`registry.StepSpec`). It
gets a `Pool`: `map` runs a module-level function over items as Ray tasks (Ray retries a task whose worker
died), `store` is where the step's shard files live while it runs: `shards/<key>/` under the shared cache
(`--cache-remote`, any fsspec store), which every worker reads and writes directly, or under the local
cache directory when there is no shared one (a cluster on one machine, or a cache on a disk every node
mounts at the same path). Knows Ray and files, nothing about data or ML.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import UsageError
from runner.registry import StepContext, StepError

if TYPE_CHECKING:
    from stores.cache import Artifact, ArtifactCache

# what a worker needs from the driver's environment to reach the stores (never printed)
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_MAX_ATTEMPTS",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "RUNNER_DUCKDB_MEMORY",
)
RESUMED = "resumed"  # what a task returns when its output was already in the store
TASK_RETRIES = 3  # a task whose worker process or node dies runs again, up to this many times


@dataclass(frozen=True)
class Executor:
    """`local`, or `ray` with the cluster's address (None: $RAY_ADDRESS, else a cluster started for the run)."""

    kind: str = "local"
    address: str | None = None

    @property
    def distributed(self) -> bool:
        return self.kind == "ray"


def parse_executor(text: str | None) -> Executor:
    """`local`, `ray` or `ray://HOST:PORT` (Ray Client) / `ray:HOST:PORT` (a cluster's GCS address)."""
    if text is None or text == "local":
        return Executor()
    if text == "ray":
        return Executor("ray")
    for prefix in ("ray://", "ray:"):
        if text.startswith(prefix) and len(text) > len(prefix):
            rest = text[len(prefix) :]
            return Executor("ray", f"ray://{rest}" if prefix == "ray://" else rest)
    raise UsageError(f"unknown executor {text!r}: use local, ray, ray://HOST:PORT (Ray Client) or ray:HOST:PORT")


class ShardStore:
    """Files of one step's shards under `url` (any fsspec URL). Every file appears whole: it is written
    beside its name and moved into place. Pickles as its URL (workers open it themselves)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._fs: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.url, self._fs = state["url"], None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.url)
        return self._fs

    def _path(self, rel: str) -> str:
        self.fs  # noqa: B018  (sets _root)
        return f"{self._root.rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self._path(rel)))

    def _place(self, rel: str, write: Callable[[str], None]) -> None:
        """`write(tmp)` beside `rel`'s name, then move it there: `rel` never holds part of a file."""
        dest = self._path(rel)
        tmp = f"{dest}.tmp-{secrets.token_hex(6)}"
        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
        write(tmp)
        self.fs.mv(tmp, dest)

    def put(self, local: Path, rel: str) -> None:
        self._place(rel, lambda tmp: self.fs.put_file(str(local), tmp))

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._place(rel, lambda tmp: self.fs.pipe_file(tmp, data))

    def get(self, rel: str, local: Path) -> Path:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self._path(rel), str(local))
        return local

    def remove(self, prefix: str) -> None:
        try:
            self.fs.rm(self._path(prefix), recursive=True)
        except FileNotFoundError:
            pass


def _run_task(fn: Callable[[Any], Any], item: Any) -> Any:
    return fn(item)


def _cluster_messages_to_stderr() -> None:
    """Ray prints the cluster's error messages ("a worker died ...") on the driver's stdout, which is runner's
    output (`--json`): send them to stderr, where the rest of the progress goes. Ray has no setting for it."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_runner", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        printer({**data, "is_err": True}, ignore_prefix)

    to_stderr._runner = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def _answers(address: str) -> bool:
    """Whether something accepts a TCP connection at `[ray://]HOST:PORT`."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            return True
    except (OSError, ValueError):
        return False


class Connection:
    """One apply's link to the cluster, opened by the first task and closed when the apply ends."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.ray: Any = None
        self.gcs: str | None = None
        self.owned = False  # this apply connected (an API caller may have connected before)
        self.lost = False  # the head stopped answering while a step ran (see `watching`)

    def open(self) -> Any:
        if self.ray is not None:
            return self.ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError:
            raise StepError("--executor ray needs Ray: pip install 'runner[ray]'") from None
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        address = self.executor.address or os.environ.get("RAY_ADDRESS")
        if address and address != "auto" and not ray.is_initialized() and not _answers(address):
            # Ray would retry for minutes, then end the process
            raise StepError(f"cannot reach the Ray cluster at {address}: nothing answers there; is it running?")
        try:
            if not ray.is_initialized():
                self.owned = True
                ray.init(
                    address=self.executor.address,
                    runtime_env={"env_vars": env} if env else None,
                    logging_level=40,  # logging.ERROR
                    log_to_driver=False,
                    configure_logging=False,
                )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = self.executor.address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            raise StepError(f"cannot reach the Ray cluster at {where}: {str(exc).splitlines()[0]}") from None
        self.ray = ray
        _cluster_messages_to_stderr()
        try:
            self.gcs = ray.get_runtime_context().gcs_address
        except Exception:  # Ray Client: the server watches the cluster
            self.gcs = None
        return ray

    def head_alive(self) -> bool:
        """Whether the cluster's GCS (its head) still answers: without it Ray ends the process after a minute."""
        return not self.gcs or _answers(self.gcs)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """While the block runs, a thread checks the head every second; once it stops answering, the block
        is interrupted (KeyboardInterrupt, with `lost` set) wherever it waits: Ray would wait a minute, then
        end the process."""
        import _thread
        import threading

        done = threading.Event()

        def watch() -> None:
            while not done.wait(1.0):
                if self.gcs and not self.head_alive():
                    self.lost = True
                    _thread.interrupt_main()
                    return

        thread = threading.Thread(target=watch, name="runner-ray-head", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def lost_error(self, when: str) -> StepError:
        """The one line for a head that stopped answering (`when`: during what)."""
        return StepError(
            f"lost the Ray cluster: its head at {self.gcs} stopped answering {when}; what the tasks committed "
            "is kept: apply again to resume"
        )

    def close(self) -> None:
        if self.ray is not None and self.owned and self.head_alive():
            self.ray.shutdown()
        self.ray, self.owned = None, False


class Pool:
    """A step's way to the cluster: `map` runs tasks, `store` holds its shard files, `locate` gives the URL a
    worker reads an input artifact's file from."""

    def __init__(self, cache: ArtifactCache, key: str, connection: Connection, log: Path | None = None) -> None:
        self.cache = cache
        self.connection = connection
        self.log = log
        remote = cache.remote
        if remote is not None:
            base = remote.fs.unstrip_protocol(remote.root)
        else:
            base = str(cache.root.resolve())
        self.store = ShardStore(f"{base}/shards/{key}")

    # -- inputs -----------------------------------------------------------------------------------------
    def locate(self, art: Artifact, rel: str) -> str:
        """Where a worker reads file `rel` of artifact `art`: its blob in the shared cache (pushed there first
        if it is not yet), or its path in the local cache."""
        remote = self.cache.remote
        if remote is None:
            return str(art.file(rel).resolve())
        from stores.errors import StoreError

        try:
            self.cache.push(art.key)
        except StoreError as exc:
            raise StepError(f"the workers read inputs from the shared cache, and pushing one failed: {exc}") from None
        digest = art.manifest["files"][rel]["hash"]
        return str(remote.fs.unstrip_protocol(f"{remote.root}/blobs/{digest[:2]}/{digest}"))

    def share(self, path: Path, rel: str) -> str:
        """Where a worker reads the driver's file `path`: a copy at `rel` in the store (made once) when the
        store is shared, else the path itself."""
        if self.cache.remote is None:
            return str(path.resolve())
        if not self.store.exists(rel):
            self.store.put(path, rel)
        return f"{self.store.url}/{rel}"

    # -- tasks ------------------------------------------------------------------------------------------
    def map(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        *,
        stage: str,
        progress: Callable[..., None] = lambda total, done, note="": None,
    ) -> list[Any]:
        """`fn(item)` for every item as Ray tasks (one CPU each); results in item order. A task that raised
        fails the step with its error; one whose worker died runs again (up to TASK_RETRIES times). A task
        returns RESUMED when its output is in the store already; the step's log counts them."""
        ray = self.connection.open()
        if not self.connection.head_alive():  # submitting would wait for it, then Ray would end the process
            raise self.connection.lost_error(f"before {stage}")
        started = time.monotonic()
        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(_run_task)
        refs = [task.remote(fn, item) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending, done = list(refs), 0
        progress(len(refs), 0, stage)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
            if not ready and not self.connection.head_alive():
                raise self.connection.lost_error(f"during {stage} ({done} of {len(refs)} tasks done)")
            for ref in ready:
                results[index[ref]] = self._get(ray, ref, stage, index[ref])
                done += 1
            progress(len(refs), done, stage)
        if self.log is not None:  # the step's log: each stage's time, and what an earlier attempt had done
            resumed = sum(r == RESUMED for r in results)
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with self.log.open("a") as f:
                f.write(f"{stage}: {len(refs)} tasks in {time.monotonic() - started:.2f} s\n")
                if resumed:
                    f.write(f"{stage}: {resumed} of {len(refs)} tasks were done by an earlier attempt\n")
        return results

    def _get(self, ray: Any, ref: Any, stage: str, i: int) -> Any:
        from ray import exceptions as rex

        try:
            return ray.get(ref)
        except rex.RayTaskError as exc:  # the task's own error, raised in the worker
            cause = exc.cause
            if isinstance(cause, StepError):
                raise StepError(str(cause)) from None
            raise RuntimeError(f"{stage} task {i} failed on the cluster:\n{exc}") from None
        except (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.OwnerDiedError) as exc:
            raise StepError(
                f"{stage} task {i}: its worker died {TASK_RETRIES + 1} times ({type(exc).__name__}); "
                "the shards done so far are kept: apply again to resume"
            ) from None
        except rex.RaySystemError as exc:
            raise StepError(
                f"lost the Ray cluster during {stage} ({str(exc).splitlines()[0]}); the shards done so far "
                "are kept: apply again to resume"
            ) from None


def runs_on(node: Any, executor: Executor) -> str:
    """Where a step runs under `executor`: `ray` (as tasks) or `driver` (in this process)."""
    from runner import registry

    spec = registry.get(node.kind)
    sharded = spec.sharded is not None and spec.shardable(node.params, node.files)
    return "ray" if executor.distributed and sharded else "driver"


class StepRunner:
    """`pipeline.execute`'s `run_step`: a step that can run as tasks does so under a distributed executor."""

    def __init__(self, executor: Executor, cache: ArtifactCache) -> None:
        self.executor, self.cache = executor, cache
        self.connection = Connection(executor)

    def __call__(self, node: Any, ctx: StepContext) -> None:
        from runner import registry

        spec = registry.get(node.kind)
        if runs_on(node, self.executor) != "ray":
            spec.run(ctx)
            return
        try:
            with self.connection.watching():
                spec.sharded(ctx, Pool(self.cache, ctx.key, self.connection, ctx.log))  # type: ignore[misc]
        except KeyboardInterrupt:
            if not self.connection.lost:
                raise
            raise self.connection.lost_error("during the step") from None

    def close(self) -> None:
        self.connection.close()
