"""The no-op memo: a second `runner apply` of an unchanged, fully cached recipe answers without loading it.

A complete apply in which every step was already cached leaves a memo in the cache (`noop/<hash>.json`): the
command line, the environment that can change a key, and the stat (size, mtime, inode, ctime) of everything the
apply read or listed (recipe files, data, model files, the lock, the recipe's ref and catalog, every file and
directory of the artifacts it used, runner's own code, the site-packages directories). The next apply with the
same command line checks those stats and, when none moved, prints what the last one printed and exits; anything
else (one stat, a variable, a missing file) falls through to the normal apply, which decides as always.

What is watched is recorded, not listed by hand: while the apply runs, a Python audit hook notes every file
opened for reading and every directory listed, and the parent directory of each (a file that appears beside a
recipe is noticed). Not memoised: a shared cache (pushes must reach it), --json, --dry-run, --verify, and any
option this module does not know. Importing this module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

VERSION = 1
# options a memoised apply may carry (they are part of its key); any other option means the normal path
_FLAGS = {"--locked", "--keep-going"}
_VALUED = {"--set", "--target", "--cache-dir"}
# environment that can change a key, a library's behaviour or what is printed
_ENV_PREFIXES = ("RUNNER_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA", "OMP_", "MKL_")
_ENV_NAMES = ("PATH", "XDG_CACHE_HOME", "HOME", "TERM", "COLORTERM", "NO_COLOR", "FORCE_COLOR", "COLUMNS")
# under the cache: what an apply writes for itself, never an input
_CACHE_OWN = ("tmp", "locks", "pins", "logs", "scratch", "noop", "stat-cache.sqlite")


def _cache_root(argv: Sequence[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg == "--cache-dir" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith("--cache-dir="):
            return Path(arg.split("=", 1)[1])
    env = os.environ.get("RUNNER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "runner"


def memo_path(argv: Sequence[str]) -> Path | None:
    """Where the memo of `runner apply ARGV...` lives, or None when such an apply is never memoised."""
    if not argv or argv[0] != "apply" or os.environ.get("RUNNER_CACHE_REMOTE"):
        return None
    args = list(argv[1:])
    positional, i = 0, 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if arg in _FLAGS:
            pass
        elif name in _VALUED:
            i += 0 if "=" in arg else 1
        elif arg.startswith("-"):
            return None
        else:
            positional += 1
        i += 1
    if positional != 1:
        return None
    key = json.dumps([VERSION, list(argv), os.getcwd()])
    return _cache_root(argv) / "noop" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _sig(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _setting() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES}
    return {"env": env, "python": [sys.executable, sys.version], "tty": sys.stderr.isatty()}


def _code_roots() -> list[Path]:
    from importlib.util import find_spec

    spec = find_spec("stores")  # found, not imported
    return [Path(__file__).parent] + ([Path(spec.origin).parent] if spec and spec.origin else [])


def _code_paths() -> list[str]:
    """runner's and stores' source files and directories, and the directories packages are installed in."""
    out: list[str] = []
    for root in _code_roots():
        for here, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out.append(here)
            out += [os.path.join(here, f) for f in files if not f.endswith(".pyc")]
    out += [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    return out


class Recorder:
    """Notes every path opened for reading and every directory listed while it is active, with its stat then (a
    file changed after the apply read it no longer matches the memo)."""

    _current: Recorder | None = None
    _hooked = False

    def __init__(self) -> None:
        self.paths: dict[str, list[int] | None] = {}

    def __enter__(self) -> Recorder:
        if not Recorder._hooked:  # an audit hook cannot be removed: one for the process, idle when none records
            sys.addaudithook(_hook)
            Recorder._hooked = True
        Recorder._current = self
        return self

    def __exit__(self, *exc: object) -> None:
        Recorder._current = None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    rec = Recorder._current
    if rec is None:
        return
    if event == "open":
        path, mode, flags = args
        if mode is not None and any(c in mode for c in "wax+"):
            return
        if mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR):
            return
    elif event not in ("os.listdir", "os.scandir"):
        return
    else:
        path = args[0]
    if isinstance(path, (str, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path not in rec.paths:
            rec.paths[path] = _sig(path)
            parent = os.path.dirname(path)
            rec.paths.setdefault(parent, _sig(parent))


def _inputs(recorded: dict[str, list[int] | None], cache: Path) -> dict[str, list[int] | None]:
    """What was read (with its stat when read), without what an apply writes for itself, system files and
    installed packages (whose directories are watched as a whole), and without directories inside the cache
    (its artifacts are watched file by file)."""
    cache = cache.resolve()
    skip = tuple(str(cache / name) for name in _CACHE_OWN)
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/proc", "/sys", "/dev"}
    skip += tuple(p.rstrip("/") + "/" for p in prefixes)
    code = tuple(f"{root}/" for root in _code_roots())
    inside = f"{cache}/"
    return {
        path: sig
        for path, sig in recorded.items()
        if not (path.startswith(skip + code) or "__pycache__" in path or path == str(cache))
        and not (path.startswith(inside) and os.path.isdir(path) and path.count("/") < inside.count("/") + 2)
    }


def _tree(root: Path) -> list[str]:
    out: list[str] = []
    for here, _dirs, files in os.walk(root):
        out.append(here)
        out += [os.path.join(here, f) for f in files]
    return out


def write(
    argv: Sequence[str], recorded: dict[str, list[int] | None], extra: Iterable[Path], lines: list[tuple[str, str]]
) -> None:
    """Leave the memo of a complete, fully cached apply: what it read (`recorded`, path -> stat when read), the
    artifact directories and other files it used (`extra`), and the lines it printed (markup, plain)."""
    where = memo_path(argv)
    if where is None:
        return
    stats = _inputs(recorded, where.parent.parent)
    now = [str(p) for p in extra if not p.is_dir()] + [f for p in extra if p.is_dir() for f in _tree(p)]
    for path in now + _code_paths():
        stats.setdefault(path, _sig(path))
    memo = {"version": VERSION, "argv": list(argv), "setting": _setting(), "stats": stats, "lines": lines}
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, where)
    except OSError:
        pass  # a memo only saves time


def forget(argv: Sequence[str]) -> None:
    where = memo_path(argv)
    if where is not None:
        try:
            where.unlink(missing_ok=True)
        except OSError:
            pass  # a stale memo is caught by its stats anyway


def replay(argv: Sequence[str]) -> int | None:
    """If `runner apply ARGV...` would find everything as the last one left it, print what that one printed and
    return its exit code (0); otherwise None."""
    where = memo_path(argv)
    if where is None:
        return None
    try:
        memo = json.loads(where.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or memo.get("version") != VERSION or memo.get("argv") != list(argv):
        return None
    stats, lines = memo.get("stats"), memo.get("lines")
    if memo.get("setting") != _setting() or not isinstance(stats, dict) or not stats or not isinstance(lines, list):
        return None
    for path, sig in stats.items():
        if _sig(path) != sig:
            return None
    if sys.stderr.isatty():
        from runner.cli.common import console

        out = console(stderr=True)
        for markup, _plain in lines:
            out.print(markup)
    else:
        sys.stderr.write("".join(plain + "\n" for _markup, plain in lines))
    return 0
