"""The machine and library versions the benchmark numbers come from (docs/benchmarks.md quotes this output).

python benchmarks/machine.py
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

LIBS = [
    "torch",
    "transformers",
    "peft",
    "datasets",
    "duckdb",
    "hnswlib",
    "sentence-transformers",
    "datasketch",
    "trl",
    "datatrove",
    "faiss-cpu",
    "usearch",
    "dvc",
    "llama-cpp-python",
]


def main() -> None:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(
        f"{os.cpu_count()} cores ({cpu}), {pages / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    versions = []
    for lib in LIBS:
        try:
            versions.append(f"{lib} {metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{lib} (absent)")
    print(", ".join(versions))


if __name__ == "__main__":
    main()
