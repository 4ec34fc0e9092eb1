"""eval.harness: lm-evaluation-harness in-process on the base and tuned models, checked against the harness's own
CLI (`lm_eval --model hf`) on the merged model directory, on real samples of six of the h2oGPT paper's tasks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, SHARED_DATA, apply_json, needs_shared_data, step_states, tiny_model_recipe

pytestmark = [
    needs_shared_data,
    pytest.mark.skipif(find_spec("lm_eval") is None, reason="needs the eval extra (lm-evaluation-harness)"),
]
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "winogrande"]
LIMIT = 25


def local_tasks(folder: Path) -> Path:
    """recipes/tasks' YAMLs beside the shared samples (PIQA's labels joined in, as its YAML says)."""
    folder.mkdir()
    for t in TASKS:
        shutil.copy(ROOT / "recipes" / "tasks" / f"{t}_local.yaml", folder)
        if t != "piqa":
            (folder / f"{t}.jsonl").symlink_to(SHARED_DATA / "eval" / f"{t}.jsonl")
    rows = (SHARED_DATA / "eval" / "piqa.jsonl").read_text().splitlines()
    labels = (SHARED_DATA / "eval" / "piqa-labels.lst").read_text().split()
    (folder / "piqa.jsonl").write_text(
        "".join(json.dumps({**json.loads(r), "label": int(x)}) + "\n" for r, x in zip(rows, labels, strict=True))
    )
    return folder


def lm_eval_cli(model_args: str, tasks: Path, names: list[str], out: Path) -> dict[str, Any]:
    """`lm_eval --model hf` by hand (run in the tasks' folder, where their data_files are): results and samples."""
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks",
         ",".join(f"{n}_local.yaml" for n in names), "--limit", str(LIMIT), "--batch_size", "8",
         "--output_path", str(out), "--log_samples"],
        cwd=tasks, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = out.glob("*/results_*.json")
    found = json.loads(results.read_text())
    found["samples"] = {
        n: [json.loads(line) for line in next(out.glob(f"*/samples_{n}_local_*.jsonl")).read_text().splitlines()]
        for n in names
    }
    return found


def assert_same(manifest_metrics: dict[str, Any], rows: list[dict[str, Any]], cli: dict[str, Any], name: str) -> None:
    """Runner's task metrics (with stderr) equal the CLI's to 1e-6, and so do its per-example scores."""
    want = cli["results"][f"{name}_local"]
    metrics = [k.split(",")[0] for k in want if k.endswith(",none") and "_stderr" not in k]
    assert metrics, want
    for m in metrics:
        assert manifest_metrics[m] == pytest.approx(want[f"{m},none"], abs=1e-6), (name, m)
        assert manifest_metrics[f"{m}_stderr"] == pytest.approx(want[f"{m}_stderr,none"], abs=1e-6), (name, m)
    assert manifest_metrics["n"] == LIMIT
    by_doc = {s["doc_id"]: s for s in cli["samples"][name]}
    assert sorted(by_doc) == [r["doc_id"] for r in rows]
    for r in rows:
        expected = [float(x[0]) for x in by_doc[r["doc_id"]]["filtered_resps"]]
        # float32 sums over other batches (the CLI scores all tasks' requests together): equal to 1e-6 relative
        assert r["loglikelihoods"] == pytest.approx(expected, rel=1e-6), (name, r["doc_id"])
        assert r["acc"] == by_doc[r["doc_id"]]["acc"]


def metrics_of(cli: Any, recipe: Path, step: str) -> dict[str, Any]:
    code, out, err = cli("show", str(recipe), step, "--path")
    assert code == 0, err
    return dict(json.loads((Path(out.strip()).parent / "manifest.json").read_text())["metrics"])


@pytest.mark.slow
def test_harness_in_process_equals_lm_eval_cli_and_caches_per_task(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = local_tasks(tmp_path / "tasks")
    recipe = tmp_path / "r.yaml"

    def write(names: list[str]) -> None:
        listed = ", ".join(str(tasks / f"{n}_local.yaml") for n in names)
        recipe.write_text(
            tiny_model_recipe(
                rest="train: {seq_len: 64, batch_size: 8, epochs: 1, merge: true}\n"
                f"eval: {{max_new_tokens: 4, harness: {{tasks: [{listed}], limit: {LIMIT}}}}}\n"
            )
        )

    write(TASKS[:-1])
    apply_json(cli, str(recipe))
    write(TASKS)  # one task more: only its two steps run
    built = {s for s, state in step_states(apply_json(cli, str(recipe))).items() if state == "built"}
    assert built == {"harness.winogrande_local", "harness.base.winogrande_local"}

    code, merged, err = cli("show", str(recipe), "merge", "--path")
    assert code == 0, err
    tuned = lm_eval_cli(f"pretrained={merged.strip()}/model", tasks, TASKS, tmp_path / "cli-tuned")
    _, init, _ = cli("show", str(recipe), "model.init", "--path")
    _, tok, _ = cli("show", str(recipe), "tokenizer", "--path")
    base = lm_eval_cli(
        f"pretrained={init.strip()}/model,tokenizer={tok.strip()}/tokenizer", tasks, TASKS[:2], tmp_path / "cli-base"
    )
    from runner import api

    build = api.load(recipe)
    for name in TASKS:
        rows = api.sql(build, f"select * from harness_{name}_local__samples order by doc_id").to_pylist()
        assert_same(metrics_of(cli, recipe, f"harness.{name}_local"), rows, tuned, name)
    for name in TASKS[:2]:
        rows = api.sql(build, f"select * from harness_base_{name}_local__samples order by doc_id").to_pylist()
        assert_same(metrics_of(cli, recipe, f"harness.base.{name}_local"), rows, base, name)

    # a new adapter re-scores the tuned model only: the base's scores do not depend on training
    states = step_states(apply_json(cli, str(recipe), "--set", "lora.rank=4"))
    assert {s for s in states if s.startswith("harness.base.")} and all(
        states[s] == "cached" for s in states if s.startswith("harness.base.")
    )
    assert all(states[f"harness.{n}_local"] == "built" for n in TASKS)

    # runner diff: each change with its 95% interval, paired on the examples, as a few lines of numpy compute it
    code, out, err = cli("diff", str(recipe), str(recipe), "--set-b", "lora.rank=4", "--json")
    assert code == 0, err
    entries = {(e["task"], e["metric"]): e for e in json.loads(out)["scores"]}
    assert {t for t, _ in entries} == {f"{n}_local" for n in TASKS}
    b_build = api.load(recipe, overrides=["lora.rank=4"])

    def scores(b: Any, step: str, metric: str) -> np.ndarray:
        rows = sorted(api.table(b, step, "samples").to_pylist(), key=lambda r: r["doc_id"])
        return np.array([r[metric] for r in rows])

    for (task, metric), e in entries.items():
        a_scores, b_scores = scores(build, f"harness.{task}", metric), scores(b_build, f"harness.{task}", metric)
        base = scores(build, f"harness.base.{task}", metric)
        for got, (x, y) in ((e["change"], (a_scores, b_scores)), (e["a"]["gain"], (base, a_scores))):
            d = y - x
            se = d.std(ddof=1) / np.sqrt(len(d))
            assert got["n"] == LIMIT and got["paired"]
            assert got["delta"] == pytest.approx(d.mean(), abs=1e-12) and got["se"] == pytest.approx(se, abs=1e-12)
            assert got["within_noise"] == (abs(d.mean()) <= 1.959963984540054 * se)
        assert e["a"]["base"] == e["b"]["base"]  # one base model, scored once
    code, out, err = cli("diff", str(recipe), str(recipe), "--set-b", "lora.rank=4", "--markdown")
    assert code == 0 and "| task | metric | n | base | A | B | A - base | B - A |" in out
    rows = [line for line in out.splitlines() if line.startswith(tuple(f"| {t} | {m} | {LIMIT} |" for t, m in entries))]
    assert len(rows) == len(entries) and all(line.count(" ± ") == 3 for line in rows)


def test_a_task_file_that_reads_a_missing_file_is_a_recipe_error(tmp_path: Path, cli: Any) -> None:
    task = tmp_path / "mine.yaml"
    task.write_text("task: mine\ndataset_path: json\ndataset_kwargs: {data_files: {validation: gone.jsonl}}\n")
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_model_recipe(rest="eval: {harness: {tasks: [mine.yaml, nameless.yaml]}}\n"))
    code, _, err = cli("plan", str(recipe))
    assert code != 0
    assert "eval.harness.tasks[0]" in err and f"{tmp_path / 'gone.jsonl'}" in err
    assert "eval.harness.tasks[1]" in err and "no `task:` name" in err


@pytest.mark.slow
def test_a_hub_task_offline_fails_with_what_to_do(tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_model_recipe(rest="train: {seq_len: 64, epochs: 1}\neval: {harness: {tasks: [arc_easy], limit: 5}}\n")
    )
    code, _, err = cli("apply", str(recipe))
    assert code != 0
    assert "harness.base.arc_easy" in err and "'arc_easy' needs its dataset from the Hugging Face hub" in err
    assert "task YAML file" in err


@pytest.mark.slow
def test_the_harness_scores_runner_serve_as_it_scores_in_process(
    tmp_path: Path, cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm_eval --model local-completions (batches of token-id prompts, echo, logprobs) against runner's server on
    the merged model: the accuracy and each example's log-likelihoods of the in-process harness step."""
    from runner import api
    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.load import load_models
    from tests.test_serving import start

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tasks = local_tasks(tmp_path / "tasks")
    names = ["arc_easy", "winogrande"]
    recipe = tmp_path / "served.yaml"
    listed = ", ".join(str(tasks / f"{n}_local.yaml") for n in names)
    recipe.write_text(
        tiny_model_recipe(
            head="name: served\n",
            rest="train: {seq_len: 64, batch_size: 8, epochs: 1}\nserve: {models: [merged]}\n"
            f"eval: {{max_new_tokens: 4, harness: {{tasks: [{listed}], limit: {LIMIT}}}}}\n",
        )
    )
    apply_json(cli, str(recipe))
    build = api.load(recipe)
    models = load_models(build, ["merged"])
    (name,) = models
    url, srv = start(create_app(models, ServeConfig(max_tokens=32)))
    _, merged, _ = cli("show", str(recipe), "merge", "--path")
    try:
        args = (
            f"model={name},base_url={url}/v1/completions,tokenizer={merged.strip()}/model,"
            "tokenizer_backend=huggingface,max_retries=1"
        )
        proc = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args, "--tasks",
             ",".join(f"{n}_local.yaml" for n in names), "--limit", str(LIMIT), "--batch_size", "4", "--output_path",
             str(tmp_path / "out"), "--log_samples"],
            cwd=tasks, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        # a generation task through local-chat-completions: the answers are the server's own to those messages
        (tasks / "boolq_gen.yaml").write_text(
            "task: boolq_gen\ndataset_path: json\ndataset_kwargs: {data_files: {validation: boolq.jsonl}}\n"
            "output_type: generate_until\nvalidation_split: validation\n"
            'doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"\n'
            "doc_to_target: \"{{'yes' if answer else 'no'}}\"\n"
            "generation_kwargs: {until: ['\\n'], max_gen_toks: 6}\n"
            "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
        )
        chat = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-chat-completions", "--model_args",
             f"model={name},base_url={url}/v1/chat/completions,max_retries=1", "--apply_chat_template",
             "--tasks", "boolq_gen.yaml", "--limit", "4", "--output_path", str(tmp_path / "chat"), "--log_samples"],
            cwd=tasks, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr[-3000:]
        lines = next((tmp_path / "chat").glob("*/samples_boolq_gen_*.jsonl")).read_text().splitlines()
        assert len(lines) == 4
        for line in lines:
            s = json.loads(line)
            logged = s["arguments"]["gen_args_0"]["arg_0"]  # the chat history as the harness logs it: JSON text
            messages = json.loads(logged[0] if isinstance(logged, list) else logged)
            body = {"model": name, "messages": messages, "max_tokens": 6, "temperature": 0, "stop": ["\n"]}
            direct = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
            assert "choices" in direct, (direct, messages)
            assert s["resps"][0][0] == direct["choices"][0]["message"]["content"]
    finally:
        srv.should_exit = True  # type: ignore[attr-defined]
    (results,) = (tmp_path / "out").glob("*/results_*.json")
    served = json.loads(results.read_text())["results"]
    for n in names:
        here = metrics_of(cli, recipe, f"harness.{n}_local")
        assert served[f"{n}_local"]["acc,none"] == pytest.approx(here["acc"], abs=1e-9), n
        samples = next((tmp_path / "out").glob(f"*/samples_{n}_local_*.jsonl")).read_text().splitlines()
        rows = api.sql(build, f"select doc_id, loglikelihoods from harness_{n}_local__samples").to_pylist()
        by_doc = {r["doc_id"]: r["loglikelihoods"] for r in rows}
        for line in samples:
            s = json.loads(line)
            assert [float(x[0]) for x in s["filtered_resps"]] == pytest.approx(by_doc[s["doc_id"]], rel=1e-5)
