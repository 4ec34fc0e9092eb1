"""Downloads from the Hugging Face hub, against a stand-in hub on 127.0.0.1 (`tests.hubserver`, huggingface_hub
pointed at it with HF_ENDPOINT): a model named by hub id and a dataset named by `hf://datasets/...` are fetched
into an empty HF_HOME, pinned by commit in the lock, fetched again by that commit under `--locked` after the
branch moved, and refused clearly when the commit is gone or the machine is offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, needs_shared_data
from tests.hubmodels import snapshot_dir
from tests.hubserver import Hub, serve

ALPACA = SHARED_DATA / "instruct" / "alpaca_en_demo.json"
OASST = SHARED_DATA / "oasst" / "oasst_en_100.trees.jsonl"
PHI = "microsoft/Phi-3.5-mini-instruct"


def runner(
    *args: str, cwd: Path, hub: Hub | None, home: Path, cache: Path, offline: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(home), RUNNER_CACHE=str(cache), HF_ENDPOINT=hub.url if hub else "http://127.0.0.1:9")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def alpaca_repo(root: Path, split: bool) -> Path:
    """Alpaca's demo as a dataset repo's files: one JSON file, or two halves under data/ beside a README."""
    records = json.loads(ALPACA.read_text())
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    if split:
        for name, part in (("a.json", records[:500]), ("b.json", records[500:])):
            (root / "data" / name).write_text(json.dumps(part))
    else:
        shutil.copyfile(ALPACA, root / "data" / "alpaca.json")
    return root


@needs_shared_data
def test_a_dataset_by_hf_url_is_fetched_pinned_and_refetched_by_its_commit(tmp_path: Path) -> None:
    hub = Hub()
    first = hub.add("datasets", "tatsu-lab/alpaca", alpaca_repo(tmp_path / "repo1", split=False))
    halves = alpaca_repo(tmp_path / "halves", split=True)
    hub.add("datasets", "acme/alpaca-parts", halves)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: d\ndata:\n  sources:\n"
        "    - {name: one, format: alpaca, path: 'hf://datasets/tatsu-lab/alpaca/data/alpaca.json'}\n"
        "    - {name: parts, format: alpaca, path: 'hf://datasets/acme/alpaca-parts@main/data/*.json'}\n"
        f"    - {{name: local, format: alpaca, path: {halves / 'data'}}}\n"
    )
    with serve(hub):
        built = runner(
            "apply", str(recipe), "--json", cwd=tmp_path, hub=hub, home=tmp_path / "hf1", cache=tmp_path / "c"
        )
        assert built.returncode == 0, built.stderr
        fetched = sorted(hub.downloads())
        assert fetched == ["data/a.json", "data/alpaca.json", "data/b.json"]  # what the URLs name, not the README
        lock = json.loads((tmp_path / "r.yaml.lock").read_text())
        assert lock["hub"]["dataset:tatsu-lab/alpaca@main"] == first
        assert "hf://datasets/tatsu-lab/alpaca/data/alpaca.json" in lock["inputs"]
        steps = {s["step"]: s for s in json.loads(built.stdout)["steps"]}
        assert steps["source.one"]["rows"]["rows"] == 999
        # the files of the glob are the local directory's, read the same way: the same rows
        same = runner(
            "sql",
            str(recipe),
            "select count(*) from source_parts p join source_local l on p.turns::varchar = l.turns::varchar "
            "and split_part(p.id, '/', 2) = split_part(l.id, '/', 2)",
            cwd=tmp_path,
            hub=hub,
            home=tmp_path / "hf1",
            cache=tmp_path / "c",
        )
        assert same.returncode == 0 and "│ 999 " in same.stdout, same.stdout + same.stderr

        # the branch moves on the hub: --locked still resolves to the locked commit, and fetches it on a new machine
        moved = tmp_path / "repo2"
        shutil.copytree(tmp_path / "repo1", moved)
        (moved / "data" / "alpaca.json").write_text(json.dumps(json.loads(ALPACA.read_text())[:10]))
        hub.add("datasets", "tatsu-lab/alpaca", moved)
        hub.requests.clear()
        check = runner(
            "lock", "--check", str(recipe), cwd=tmp_path, hub=hub, home=tmp_path / "hf2", cache=tmp_path / "c"
        )
        assert check.returncode == 0, check.stderr
        assert ("GET", f"/datasets/tatsu-lab/alpaca/resolve/{first}/data/alpaca.json") in hub.requests
        unpinned = runner(
            "lock", "--check", str(recipe), cwd=tmp_path, hub=hub, home=tmp_path / "hf3", cache=tmp_path / "c"
        )
        assert unpinned.returncode == 0, unpinned.stderr  # `lock --check` is pinned too: the same commit
        plan = runner("plan", str(recipe), cwd=tmp_path, hub=hub, home=tmp_path / "hf4", cache=tmp_path / "c")
        assert plan.returncode == 0 and "source.one" in plan.stdout  # unpinned: main is the new commit, to build

        # the locked commit gone from the hub: refused, in one message
        del hub.repos[("datasets", "tatsu-lab/alpaca")].commits[first]
        gone = runner(
            "lock", "--check", str(recipe), cwd=tmp_path, hub=hub, home=tmp_path / "hf5", cache=tmp_path / "c"
        )
        assert gone.returncode == 2 and "Traceback" not in gone.stderr
        assert "dataset tatsu-lab/alpaca" in gone.stderr and "could not be downloaded" in gone.stderr

    # offline, with nothing cached: the same clear message, naming HF_HUB_OFFLINE
    offline = runner(
        "plan", str(recipe), cwd=tmp_path, hub=None, home=tmp_path / "hf6", cache=tmp_path / "c", offline=True
    )
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr and "Traceback" not in offline.stderr


@pytest.mark.slow
@needs_shared_data
def test_a_model_by_hub_id_is_downloaded_pinned_and_refetched_by_its_commit(
    tmp_path: Path, family_hub: tuple[Path, dict[str, str]]
) -> None:
    home, commits = family_hub
    served = tmp_path / "served"
    shutil.copytree(snapshot_dir(home, PHI, commits["phi3"]), served)
    (served / "pytorch_model.bin").write_bytes(b"pickled weights are never fetched")
    (served / "original").mkdir()
    (served / "original" / "consolidated.pth").write_bytes(b"nor other checkpoints")
    hub = Hub()
    first = hub.add("models", PHI, served)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""name: m
data:
  sources: [{{name: s, format: oasst, path: {OASST}, lang: [en], limit: 6}}]
  prompt: {{template: chat}}
model:
  base: {PHI}
lora: {{rank: 4}}
train: {{seq_len: 64, batch_size: 4, max_steps: 1}}
"""
    )
    with serve(hub):
        built = runner("apply", str(recipe), cwd=tmp_path, hub=hub, home=tmp_path / "hf1", cache=tmp_path / "c1")
        assert built.returncode == 0, built.stderr
        assert f"fetching model {PHI} at {first[:12]} from the hub" in built.stderr
        assert not [f for f in hub.downloads() if f.endswith((".bin", ".pth"))]
        lock = json.loads((tmp_path / "r.yaml.lock").read_text())
        assert lock["hub"] == {f"model:{PHI}@main": first} and lock["models"]["train"] == first
        snapshot = snapshot_dir(tmp_path / "hf1", PHI, first)
        assert (snapshot / "model.safetensors").read_bytes() == (served / "model.safetensors").read_bytes()

        # main moves; another machine (empty caches) builds from the lock: the locked commit is what it fetches
        moved = tmp_path / "moved"
        shutil.copytree(served, moved)
        (moved / "config.json").write_text((moved / "config.json").read_text().replace("10000.0", "20000.0"))
        hub.add("models", PHI, moved)
        hub.requests.clear()
        again = runner(
            "apply",
            str(recipe),
            "--locked",
            "--rebuild-nondeterministic",
            cwd=tmp_path,
            hub=hub,
            home=tmp_path / "hf2",
            cache=tmp_path / "c2",
        )
        assert again.returncode == 0, again.stderr
        assert ("GET", f"/{PHI}/resolve/{first}/model.safetensors") in hub.requests
        assert not [p for m, p in hub.requests if "/revision/" in p]  # the lock's commit: no branch resolved
        # the recipe names another revision: `lock --check` says which commit moved
        second = hub.repos[("models", PHI)].refs["main"]
        check = runner(
            "lock",
            "--check",
            str(recipe),
            "--set",
            f"model.revision={second}",
            cwd=tmp_path,
            hub=hub,
            home=tmp_path / "hf2",
            cache=tmp_path / "c2",
        )
        assert check.returncode == 3, check.stderr
        assert f"the hub commit of train's model {first[:12]} -> {second[:12]}" in check.stderr

    # offline with an empty cache: the one clear message, no traceback
    offline = runner(
        "apply", str(recipe), cwd=tmp_path, hub=None, home=tmp_path / "hf3", cache=tmp_path / "c3", offline=True
    )
    assert offline.returncode != 0 and "Traceback" not in offline.stderr
    assert f"model {PHI} (revision main) is not in the Hugging Face cache" in offline.stderr
    assert "HF_HUB_OFFLINE is set" in offline.stderr
