"""A validated recipe becomes a graph of steps: sources -> [mix] -> filters… -> format -> split.

This is the only module that knows both the recipe's sections and the step kinds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from runner import registry
from runner.errors import Problem, RecipeError
from runner.graph import Graph, GraphError, StepNode
from runner.recipe import LoadedRecipe, show_path
from runner.steps.sources import HfDiskSource, Mix, TableSource, source_files
from runner.steps.split import GROUP_KEYS


def _files(loaded: LoadedRecipe, params: Any, at: tuple[str | int, ...], problems: list[Problem]) -> dict[str, Path]:
    """Resolve the params' external paths against the recipe that wrote them; record missing ones."""
    files: dict[str, Path] = {}
    for key, rel in params.external_paths().items():
        where = (*at, key)
        if rel.startswith("hf://"):
            hub_file = _hub_dataset(loaded, rel, where, problems)
            if hub_file is not None:
                files[rel] = hub_file
            continue
        resolved = (loaded.base_dir(where) / rel).resolve()
        want_dir = key in params.DIR_FIELDS
        either = params.may_be_directory(key) and resolved.is_dir()
        if either and not source_files(resolved):
            problems.append(Problem(loaded.where(where), show_path(where), f"{rel!r} is a directory with no files"))
        if not (resolved.is_dir() if want_dir or either else resolved.is_file()):
            what = "directory" if want_dir else "file"
            if resolved.exists():
                found = "a directory" if resolved.is_dir() else "not a regular file"
                message = f"{rel!r} is {found} ({resolved}); expected a {what}"
            else:
                message = f"{what} {rel!r} not found (looked for {resolved})"
            problems.append(Problem(loaded.where(where), show_path(where), message))
        files[rel] = resolved
    return files


def _hub_dataset(loaded: LoadedRecipe, url: str, where: tuple[str | int, ...], problems: list[Problem]) -> Path | None:
    """An `hf://datasets/...` path: its files fetched into the Hugging Face cache, the commit recorded for the lock."""
    from runner.steps.hub import HubError, dataset_path

    try:
        path, pin, commit = dataset_path(url, loaded.pins)
    except HubError as exc:
        problems.append(Problem(loaded.where(where), show_path(where), str(exc)))
        return None
    loaded.resolved[pin] = commit
    return path


def _hub_model(loaded: LoadedRecipe, problems: list[Problem]) -> str | None:
    """The commit a hub base model's revision resolves to (None: not a hub id, or offline and not cached)."""
    from runner.steps.hub import HubError, pin_name, resolve

    spec = loaded.recipe.model
    if spec is None or not isinstance(spec.base, str) or spec.is_local():
        return None
    try:
        commit = resolve(spec.base, spec.revision, "model", loaded.pins)
    except HubError as exc:
        problems.append(Problem(loaded.where(("model", "base")), "model.base", str(exc)))
        return None
    if commit:
        loaded.resolved[pin_name("model", spec.base, spec.revision)] = commit
    return commit


def compile_recipe(loaded: LoadedRecipe) -> Graph:
    nodes: list[StepNode] = []
    problems: list[Problem] = []

    def origin(*path: str | int) -> str:
        return str(loaded.where(tuple(path)))

    if loaded.recipe.data is not None:
        nodes += _data_nodes(loaded, problems, origin)
    if loaded.recipe.index is not None:
        nodes += _index_nodes(loaded, problems, origin)
    if loaded.recipe.model is not None:
        nodes += _training_nodes(loaded, problems, origin)
    try:
        return Graph(nodes)
    except GraphError as exc:
        raise RecipeError([Problem(loaded.where(()), "", str(exc))]) from None


def _check(problems: list[Problem]) -> None:
    if problems:
        raise RecipeError(problems, "Fix the path (relative paths are relative to the recipe file).")


def _data_nodes(loaded: LoadedRecipe, problems: list[Problem], origin: Any) -> list[StepNode]:
    """sources -> [mix] -> filters... -> format -> split -> [export]"""
    data = loaded.recipe.data
    assert data is not None
    nodes: list[StepNode] = []
    sources = []
    group_column = data.split.group_by if data.split.group_by not in GROUP_KEYS else None
    tables = [s for s in data.sources if isinstance(s, (TableSource, HfDiskSource))]
    if group_column and not tables:
        problems.append(
            Problem(
                loaded.where(("data", "split", "group_by")),
                "data.split.group_by",
                f"{group_column!r} is not one of {', '.join(GROUP_KEYS)}, and there is no table source "
                "(jsonl/json/csv/parquet/hf_disk) whose column it could name",
            )
        )
    for i, src in enumerate(data.sources):
        if group_column and isinstance(src, (TableSource, HfDiskSource)):
            if src.columns.group not in (None, group_column):
                problems.append(
                    Problem(
                        loaded.where(("data", "sources", i, "columns", "group")),
                        f"data.sources[{i}].columns.group",
                        f"{src.columns.group!r} disagrees with data.split.group_by {group_column!r}",
                    )
                )
            src = src.model_copy(update={"columns": src.columns.model_copy(update={"group": group_column})})
        files = _files(loaded, src, ("data", "sources", i), problems)
        name = f"source.{src.name}"
        kind = registry.entry_step("source", src)
        nodes.append(StepNode(name, kind, src, (), files, origin("data", "sources", i)))
        sources.append(name)
    filter_files = [_files(loaded, f, ("data", "filters", i), problems) for i, f in enumerate(data.filters)]
    prompt_files = _files(loaded, data.prompt, ("data", "prompt"), problems)
    _check(problems)

    last = sources[0]
    weights = [s.weight for s in data.sources]
    if len(sources) > 1 or weights != [1.0]:
        nodes.append(
            StepNode(
                "mix", "mix", Mix(weights=weights, seed=data.mix_seed), tuple(sources), {}, origin("data", "sources")
            )
        )
        last = "mix"

    used: dict[str, int] = {}
    for i, flt in enumerate(data.filters):
        if flt.name:  # an explicit name is used as is (a clash is an error)
            name = f"filter.{flt.name}"
        else:  # the second unnamed dedup is filter.dedup-2, and so on
            base = f"filter.{flt.kind}"
            used[base] = used.get(base, 0) + 1
            name = base if used[base] == 1 else f"{base}-{used[base]}"
        nodes.append(StepNode(name, f"filter.{flt.kind}", flt, (last,), filter_files[i], origin("data", "filters", i)))
        last = name

    format_inputs: tuple[str, ...] = (last,)
    if data.prompt.template == "chat" and data.prompt.tokenizer is None:
        problem = _no_base_template(loaded.recipe.model)
        if problem:
            where = ("data", "prompt", "template")
            problems.append(Problem(loaded.where(where), show_path(where), problem))
            _check(problems)
        format_inputs += ("tokenizer",)  # the base model's tokenizer, with its chat template
    nodes.append(StepNode("format", "format", data.prompt, format_inputs, prompt_files, origin("data", "prompt")))
    nodes.append(StepNode("split", "split", data.split, ("format",), {}, origin("data", "split")))
    if data.export is not None:
        nodes.append(StepNode("export", "export", data.export, ("split",), {}, origin("data", "export")))
    return nodes


def _index_nodes(loaded: LoadedRecipe, problems: list[Problem], origin: Any) -> list[StepNode]:
    """docs -> chunk -> embed -> index"""
    from runner.steps.documents import ChunkParams, DocsParams
    from runner.steps.indexing import IndexParams

    ix = loaded.recipe.index
    assert ix is not None
    doc_files: dict[str, Path] = {}
    for i, src in enumerate(ix.documents):
        at = ("index", "documents", i, "path")
        resolved = (loaded.base_dir(at) / src.path).resolve()
        if not resolved.exists():
            problems.append(Problem(loaded.where(at), show_path(at), f"{src.path!r} not found (looked for {resolved})"))
        doc_files[src.path] = resolved
    model_files = _files(loaded, ix.embed, ("index", "embed"), problems)
    _check(problems)
    at = origin("index")
    return [
        StepNode("docs", "docs", DocsParams(sources=ix.documents), (), doc_files, at),
        StepNode(
            "chunk",
            "chunk",
            ChunkParams(chunk=ix.chunk, model=ix.embed.model),
            ("docs",),
            model_files if ix.chunk.by == "tokens" else {},
            origin("index", "chunk"),
        ),
        StepNode("embed", "embed", ix.embed, ("chunk",), model_files, origin("index", "embed")),
        StepNode(
            "index",
            "index",
            IndexParams(
                embed=ix.embed,
                hnsw=ix.hnsw,
                exact_below=ix.exact_below,
                hybrid=ix.hybrid,
                group_by=ix.group_by,
                depth=ix.depth,
            ),
            ("embed", "chunk"),
            {},
            origin("index"),
        ),
    ] + ([] if ix.eval is None else [_index_eval_node(loaded, problems, origin, model_files)])


def _index_eval_node(
    loaded: LoadedRecipe, problems: list[Problem], origin: Any, model_files: dict[str, Path]
) -> StepNode:
    from runner.steps.indexing import RetrievalEvalParams

    ix = loaded.recipe.index
    assert ix is not None and ix.eval is not None
    files = _files(loaded, ix.eval, ("index", "eval"), problems)
    _check(problems)
    params = RetrievalEvalParams(eval=ix.eval, embed=ix.embed)
    return StepNode("index.eval", "index.eval", params, ("index",), {**model_files, **files}, origin("index", "eval"))


def _no_base_template(model: Any) -> str | None:
    """Why `template: chat` has no base model's template to use (None: it has the base's tokenizer step)."""
    if model is None:
        return (
            "chat renders with a tokenizer's chat template: name a base model (model.base) whose tokenizer has "
            "one, or set data.prompt.tokenizer to a tokenizer directory"
        )
    if model.tokenizer is not None and model.tokenizer.train is not None:
        return (
            "chat renders with the model's chat template, and a tokenizer trained on the recipe's text has none: "
            "set data.prompt.tokenizer to a tokenizer directory with one, or use template: human_bot or plain"
        )
    return None


def _training_nodes(loaded: LoadedRecipe, problems: list[Problem], origin: Any) -> list[StepNode]:
    """tokenizer -> [model.init] -> tokenize -> train -> [merge] -> [eval], when the recipe names a model."""
    from runner.steps.evaluation import EvalParams
    from runner.steps.models import BaseRef
    from runner.steps.train_config import InitParams, MergeParams, TokenizeParams, TokenizerParams, TrainParams

    r = loaded.recipe
    spec = r.model
    assert spec is not None and r.data is not None
    base_files = _files(loaded, spec, ("model",), problems)
    tok_files = _files(loaded, spec.tokenizer, ("model", "tokenizer"), problems) if spec.tokenizer else {}
    commit = _hub_model(loaded, problems)
    _check(problems)
    at = origin("model")
    trains_tokenizer = spec.tokenizer is not None and spec.tokenizer.train is not None
    nodes = [
        StepNode(
            "tokenizer",
            "tokenizer",
            TokenizerParams(
                tokenizer=spec.tokenizer, base=spec.base if isinstance(spec.base, str) else None, commit=commit
            ),
            ("split",) if trains_tokenizer else (),
            {**tok_files, **({} if spec.tokenizer else base_files)},
            at,
        )
    ]
    model_inputs: tuple[str, ...] = ("tokenizer",)
    if isinstance(spec.base, BaseRef):
        nodes.append(
            StepNode("model.init", "model.init", InitParams(from_config=spec.base.from_config), ("tokenizer",), {}, at)
        )
        model_inputs += ("model.init",)
    nodes.append(
        StepNode(
            "tokenize",
            "tokenize",
            TokenizeParams(seq_len=r.train.seq_len, packing=r.train.packing),
            ("split", "tokenizer"),
            {},
            origin("train"),
        )
    )
    # `merge` shapes the graph (a merge step after training), it does not change training: keep it out of the key
    train = TrainParams(model=spec, commit=commit, lora=r.lora, train=r.train.model_copy(update={"merge": False}))
    nodes.append(StepNode("train", "train", train, ("tokenize", *model_inputs), base_files, origin("train")))
    # one merge step, whoever asks for the merged model: train.merge, package (merged, gguf), serve (merged)
    packs_merged = r.package is not None and bool({"merged", "gguf"} & set(r.package.formats))
    merged = r.train.merge or packs_merged or "merged" in r.serve.models or r.serve.engine == "vllm"
    if merged:
        nodes.append(
            StepNode(
                "merge",
                "merge",
                MergeParams(train=train, template=r.data.prompt.template),
                ("train", *model_inputs),
                base_files,
                origin("train"),
            )
        )
    if r.package is not None:
        from runner.steps.packaging import PackageParams

        pkg_files = _files(loaded, r.package, ("package",), problems)
        _check(problems)
        nodes.append(
            StepNode(
                "package",
                "package",
                PackageParams(train=train, package=r.package, template=r.data.prompt.template),
                ("train",) + (("merge",) if packs_merged else ()) + model_inputs,
                {**base_files, **pkg_files},
                origin("package"),
            )
        )
    if r.eval is not None:
        # harness tasks and judges are steps of their own: adding or changing one does not re-run this one
        ev = EvalParams(
            model=spec,
            commit=commit,
            template=r.data.prompt.template,
            eval=r.eval.model_copy(update={"harness": None, "judge": None}),
        )
        nodes.append(StepNode("eval", "eval", ev, ("train", "tokenize", *model_inputs), base_files, origin("eval")))
        base = BaseInputs(spec, commit, model_inputs, base_files)
        nodes += _harness_nodes(loaded, problems, base) + _judge_nodes(loaded, problems, base)
    return nodes


class BaseInputs(NamedTuple):
    """What every step that loads the base model reads: its spec, its hub commit, the steps that make it (tokenizer,
    model.init) and its files."""

    spec: Any
    commit: str | None
    inputs: tuple[str, ...]
    files: dict[str, Path]


def _judge_nodes(loaded: LoadedRecipe, problems: list[Problem], base: BaseInputs) -> list[StepNode]:
    """answers.base and answers (the held-out prompts answered by each model), then judge.[base.]KIND for each
    judge of eval.judge."""
    from runner.steps.answers import AnswersConfig, AnswersParams
    from runner.steps.judge import JudgeParams

    assert loaded.recipe.eval is not None and loaded.recipe.data is not None
    j = loaded.recipe.eval.judge
    if j is None:
        return []
    at = ("eval", "judge")
    files = _files(loaded, j, at, problems)
    _check(problems)
    where = str(loaded.where(at))
    prompts = AnswersConfig(**{k: getattr(j, k) for k in AnswersConfig.model_fields})
    prompt_files = {k: v for k, v in files.items() if k == j.prompts}
    nodes = []
    for tuned in (False, True):
        params = AnswersParams(
            model=base.spec,
            commit=base.commit,
            template=loaded.recipe.data.prompt.template,
            tuned=tuned,
            answers=prompts,
        )
        inputs = (("train",) if tuned else ()) + base.inputs + (("split",) if j.prompts == "validation" else ())
        name = "answers" if tuned else "answers.base"
        nodes.append(StepNode(name, "answers", params, inputs, {**base.files, **prompt_files}, where))
        for kind in j.kinds():
            # only what this judge reads: another judge's settings are not in its key
            own: dict[str, Any] = {"reward": j.reward, "batch_size": j.batch_size} if kind == "reward" else {}
            judge = JudgeParams(kind=kind, llm=j.llm if kind == "llm" else None, **own)
            judge_files = {j.reward: files[j.reward]} if kind == "reward" and j.reward else {}
            step_name = f"judge.{kind}" if tuned else f"judge.base.{kind}"
            nodes.append(StepNode(step_name, "judge", judge, (name,), judge_files, where))
    return nodes


def _harness_nodes(loaded: LoadedRecipe, problems: list[Problem], base: BaseInputs) -> list[StepNode]:
    """harness.base.TASK (the base model: no training input, so a new adapter does not re-score it) and
    harness.TASK (the tuned model), for each task of eval.harness."""
    from runner.steps.harness import HarnessParams, is_task_file, task_files

    assert loaded.recipe.eval is not None
    h = loaded.recipe.eval.harness
    if h is None:
        return []
    nodes = []
    for i, task in enumerate(h.tasks):
        at = ("eval", "harness", "tasks", i)
        name, files = task, {}
        if is_task_file(task):
            path = (loaded.base_dir(at) / task).resolve()
            try:
                name, deps = task_files(path)
            except (OSError, ValueError) as exc:
                problems.append(Problem(loaded.where(at), show_path(at), str(exc)))
                continue
            missing = [d for d in deps if not d.is_file()]
            if missing:
                problems.append(
                    Problem(loaded.where(at), show_path(at), f"task {task!r} reads {missing[0]}, which is not a file")
                )
                continue
            files = {task: path} | {f"{task}:{os.path.relpath(d, path.parent)}": d.resolve() for d in deps[1:]}
        for tuned in (False, True):
            params = HarnessParams(
                model=base.spec,
                commit=base.commit,
                task=task,
                name=name,
                tuned=tuned,
                num_fewshot=h.num_fewshot,
                limit=h.limit,
                batch_size=h.batch_size,
            )
            inputs = ("train", *base.inputs) if tuned else base.inputs
            step_name = f"harness.{name}" if tuned else f"harness.base.{name}"
            nodes.append(StepNode(step_name, "harness", params, inputs, {**base.files, **files}, str(loaded.where(at))))
    _check(problems)
    return nodes
