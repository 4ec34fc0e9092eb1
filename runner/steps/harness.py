"""`eval.harness`: EleutherAI's lm-evaluation-harness on the base and the tuned model, one step per (task, model),
so adding a task runs only that task and a new adapter never re-scores the base.

The harness runs in-process through its own Hugging Face wrapper (`HFLM`) around the model this step loads (the
tuned one merged in memory, as the `merge` step writes it). A task is a harness task name (its data comes from the
hub) or a task YAML file (its `dataset_kwargs.data_files` relative to the YAML's folder): the YAML, what it
includes, its `!function` modules and its data files are the step's files, so editing any of them re-runs it.
Per-task metrics with the harness's own stderr go in the manifest; one row per example in the `samples` table."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from runner.params import Params
from runner.registry import StepContext, StepError, step
from runner.steps.models import ModelSpec


class HarnessConfig(Params):
    """lm-evaluation-harness tasks, scored on the base model and the tuned one."""

    tasks: list[str] = Field(
        min_length=1,
        description="harness task names (e.g. arc_easy; their data comes from the hub) or task YAML files "
        "(local data: `dataset_kwargs.data_files` relative to the YAML's folder)",
    )
    num_fewshot: int | None = Field(None, ge=0, description="examples in each prompt (default: the task's)")
    limit: int | None = Field(None, ge=1, description="score the first N examples of each task (default: all)")
    batch_size: int = Field(8, ge=1)


class HarnessParams(Params):
    model: ModelSpec
    commit: str | None = None
    task: str  # as the recipe writes it: a name or a YAML path
    name: str  # the harness's task name
    tuned: bool  # the tuned model (base + adapter); False: the base model
    num_fewshot: int | None
    limit: int | None
    batch_size: int


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


class _TaskLoader(yaml.SafeLoader):
    """Reads a harness task YAML without running it: `!function mod.fn` is kept as its text."""


def _function_tag(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    assert isinstance(node, yaml.ScalarNode)
    return f"!function {loader.construct_scalar(node)}"


_TaskLoader.add_constructor("!function", _function_tag)


def read_task_yaml(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.load(path.read_text(), Loader=_TaskLoader)  # a SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read task file {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"task file {path} is not a mapping")
    return cfg


def _data_files(cfg: dict[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(files, dict):
        files = list(files.values())
    flat: list[str] = []
    for f in files if isinstance(files, list) else [files]:
        flat += f if isinstance(f, list) else [f]
    return [str(f) for f in flat]


def task_files(path: Path) -> tuple[str, list[Path]]:
    """A task YAML's task name and every file its result depends on: itself, what it includes, the modules of its
    `!function`s and its data files (relative paths are relative to the YAML's folder). Raises ValueError."""
    cfg = read_task_yaml(path)
    files, name = [path], cfg.get("task")
    for inc in [cfg["include"]] if isinstance(cfg.get("include"), str) else cfg.get("include") or []:
        inc_name, inc_files = task_files(path.parent / inc)
        files += inc_files
        name = name or inc_name
    for text in re.findall(r"!function\s+([\w.]+)\.\w+", path.read_text()):
        files.append(path.parent / f"{text.replace('.', '/')}.py")
    files += [path.parent / f for f in _data_files(cfg)]
    if not isinstance(name, str) or not name:
        raise ValueError(f"task file {path} has no `task:` name")
    return name, files


def _task_config(path: Path) -> dict[str, Any]:
    """The task YAML as the harness reads it (includes merged, `!function`s resolved), data files made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the harness's own reader of task files

    cfg: dict[str, Any] = load_yaml(path, resolve_func=True)
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")

    def absolute(f: Any) -> Any:
        if isinstance(f, list):
            return [absolute(x) for x in f]
        return str((path.parent / f).resolve()) if isinstance(f, str) and "://" not in f else f

    if files is not None:
        kwargs["data_files"] = (
            {k: absolute(v) for k, v in files.items()} if isinstance(files, dict) else absolute(files)
        )
        cfg["dataset_kwargs"] = kwargs
    return cfg


@cache
def _task_manager(defaults: bool) -> Any:
    """The harness's task index, made once a process: with its built-in tasks (a hub task name) it reads thousands of
    task files (seconds); a task file alone needs none of them."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=defaults)


def _progress_model(ctx: StepContext, model: Any, tokenizer: Any, batch_size: int) -> Any:
    """The harness's HFLM around `model`, reporting requests done to `ctx.progress` (in chunks of requests, each
    scored as the harness scores a whole list)."""
    from lm_eval.models.huggingface import HFLM

    class Reporting(HFLM):
        def _chunked(self, method: Any, requests: list[Any], what: str) -> list[Any]:
            out: list[Any] = []
            chunk = 1024
            for i in range(0, len(requests), chunk):
                out += method(requests[i : i + chunk], disable_tqdm=True)
                ctx.progress(len(requests), min(i + chunk, len(requests)), what)
            return out

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked(super().loglikelihood, requests, "log-likelihoods")

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            return self._chunked(super().generate_until, requests, "generations")

    return Reporting(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def sample_rows(samples: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per example: its prompt, the target, each choice's log-likelihood (multiple choice) or the answer
    (generation), the chosen choice, and the example's score on each metric."""
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        resps = s["filtered_resps"]
        choice = bool(resps) and isinstance(resps[0], (tuple, list))
        lls = [float(r[0]) for r in resps] if choice else None
        first = next(iter(s["arguments"]), None)
        prompt = first[0] if isinstance(first, (tuple, list)) else None
        row = {
            "doc_id": int(s["doc_id"]),
            "prompt": str(prompt) if prompt is not None else None,
            "target": str(s["target"]),
            "loglikelihoods": lls,
            "chosen": max(range(len(lls)), key=lls.__getitem__) if lls else None,
            "answer": None if choice else str(resps[0] if isinstance(resps, list) else resps),
        }
        rows.append(row | {m: float(s[m]) if s.get(m) is not None else None for m in metrics})
    return rows


@step(
    "harness",
    version="1",
    params=HarnessParams,
    libs=("lm_eval", "torch", "transformers", "peft", "datasets"),
    reproducible=False,
)
def harness(ctx: StepContext) -> None:
    from runner.steps.quiet import chatter_to, quiet_ml

    quiet_ml()
    try:
        import lm_eval
    except ImportError:
        raise StepError(
            "eval.harness needs lm-evaluation-harness: pip install 'runner[eval]' -c recipes/constraints.txt"
        ) from None
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from runner.steps.models import load_model, use_precision
    from runner.steps.trainer import base_path

    p: HarnessParams = ctx.params
    task: str | dict[str, Any] = p.name
    if is_task_file(p.task):
        task = _task_config(ctx.files[p.task])
    tok = AutoTokenizer.from_pretrained(ctx.input("tokenizer").file("tokenizer"))
    precision = use_precision(p.model.precision)
    model = load_model(base_path(ctx, p), precision, trust_remote_code=p.model.trust_remote_code)  # type: ignore[arg-type]
    if p.tuned:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ctx.input("train").file("adapter"))
        if precision not in ("int8", "int4"):  # as the merge step writes it; quantized bases stay unmerged
            model = model.merge_and_unload()
    model.eval()
    try:
        with chatter_to(ctx.log):  # the harness's progress bars and log lines
            lm = _progress_model(ctx, model, tok, p.batch_size)
            result = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                task_manager=_task_manager(not is_task_file(p.task)),
                num_fewshot=p.num_fewshot,
                limit=p.limit,
                log_samples=True,
            )
    except (ConnectionError, OSError) as exc:
        if is_task_file(p.task):
            raise StepError(f"task {p.task}: {exc}") from None
        raise StepError(
            f"harness task {p.name!r} needs its dataset from the Hugging Face hub, which could not be reached "
            f"({str(exc).splitlines()[0]}); offline, give a task YAML file whose data_files are local"
        ) from None
    assert result is not None
    scores = result["results"][p.name]
    metrics = sorted(k.split(",")[0] for k in scores if "," in k and "_stderr" not in k)
    ctx.metrics.update(
        {
            "task": p.name,
            "model": "tuned" if p.tuned else "base",
            "n": len(result["samples"][p.name]),
            "num_fewshot": result["n-shot"].get(p.name),
            "precision": precision,
        }
    )
    for m in metrics:
        ctx.metrics[m] = _number(scores.get(f"{m},none"))
        ctx.metrics[f"{m}_stderr"] = _number(scores.get(f"{m}_stderr,none"))
    rows = sample_rows(result["samples"][p.name], metrics)
    pq.write_table(pa.Table.from_pylist(rows), ctx.table("samples", "samples.parquet", len(rows)))


def _number(v: Any) -> float | None:
    """A metric as a float (the harness writes "N/A" for a stderr it could not compute)."""
    return float(v) if isinstance(v, (int, float)) else None
