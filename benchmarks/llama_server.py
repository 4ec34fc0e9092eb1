"""llama.cpp's own C++ server, `llama-server`, built from the llama.cpp source that llama-cpp-python's source
distribution vendors (the tree RUNNER_GGUF_CONVERTER points into, as .ci/run sets it), once: the build is kept in
~/.cache/runner-bench/ under a hash of the source's path and version.

    python benchmarks/llama_server.py            # build (about 10 min on 2 cores) and print the binary's path
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def source() -> Path:
    converter = os.environ.get("RUNNER_GGUF_CONVERTER")
    if not converter:
        sys.exit("set RUNNER_GGUF_CONVERTER to llama.cpp's convert_hf_to_gguf.py (see .ci/run)")
    return Path(converter).resolve().parent


def build(src: Path | None = None) -> Path:
    """The `llama-server` binary built from `src` (CPU, native instructions, no HTTPS), building it if needed."""
    src = src or source()
    stamp = hashlib.sha256(f"{src}:{(src / 'CMakeLists.txt').stat().st_mtime_ns}".encode()).hexdigest()[:12]
    where = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "runner-bench" / f"llama.cpp-{stamp}"
    binary = where / "bin" / "llama-server"
    if binary.is_file():
        return binary
    print(f"building llama-server from {src} into {where} (once; about 10 min on 2 cores)", file=sys.stderr)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
    flags += ["-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(where), "-G", "Ninja", *flags], check=True)
    subprocess.run(
        ["cmake", "--build", str(where), "--target", "llama-server", "-j", str(os.cpu_count() or 1)], check=True
    )
    return binary


if __name__ == "__main__":
    print(build())
