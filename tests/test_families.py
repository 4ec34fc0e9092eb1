"""The models users bring, by hub id alone: each family's real tokenizer, chat template and scaled-down config in a
hub-layout cache (`tests.hubmodels`), offline. One recipe per family names only the hub id, `template: chat` (the
families without a template use h2oGPT's `human_bot`) and `target_modules: auto`; it trains a few steps at int4
(QLoRA), packages the adapter, the merged model and a GGUF, and serves a chat turn. Each result is checked against
independent code: the template's own rendering, PEFT's mapping, the model's linear layers, llama.cpp's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner import api
from tests import hubmodels
from tests.conftest import SHARED_DATA, needs_shared_data

OASST = SHARED_DATA / "oasst" / "oasst_en_100.trees.jsonl"
CONVERTER = hubmodels.CONVERTER
needs_gguf = pytest.mark.skipif(
    not (Path(CONVERTER).is_file() and __import__("importlib").util.find_spec("llama_cpp")),
    reason="needs `pip install -e .[gguf]` and RUNNER_GGUF_CONVERTER (see .ci/run)",
)
# the pre-tokenizer llama.cpp's converter names from each tokenizer's hash (its own table, unpatched); GPT-NeoX-20B's
# tokenizer hashes as MPT's and OLMo's, which use it; sentencepiece vocabularies are not hashed
PRE_TOKENIZER = {
    "llama3": "llama-bpe",
    "qwen2.5": "qwen2",
    "falcon": "falcon",
    "gpt_neox": "olmo",
    "mistral": "default",
    "phi3": "default",
}


@pytest.fixture
def offline_hub(
    family_hub: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, dict[str, str]]:
    """The families' hub cache as this process's, offline: the HF_HUB_OFFLINE variable, and what huggingface_hub read
    of it at import (nothing is fetched)."""
    import huggingface_hub.constants

    home, _ = family_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return family_hub


def chat_tokens(tmp_path: Path, repo: str, data: str) -> api.Build:
    """A recipe whose `data:` section opens with `data` (sources, filters) in `repo`'s chat template, built up to
    `tokenize`, every row in train and none cut."""
    path = tmp_path / "r.yaml"
    path.write_text(
        f"""name: chat
data:
{data}  prompt: {{template: chat}}
  split: {{validation: 0}}
model:
  base: {repo}
train: {{seq_len: 100000}}
"""
    )
    build = api.load(path, cache_dir=tmp_path / "c", targets=["tokenize"])
    assert api.apply(build).ok
    return build


def family_recipe(tmp_path: Path, family: hubmodels.Family) -> Path:
    template = "chat" if family.template else "human_bot"
    path = tmp_path / "r.yaml"
    path.write_text(
        f"""name: fam
data:
  sources: [{{name: s, format: oasst, path: {OASST}, lang: [en], limit: 12}}]
  prompt: {{template: {template}}}
  split: {{validation: 0.2, seed: 0}}
model:
  base: {family.repo}
  precision: int4
lora: {{rank: 4, target_modules: auto}}
train: {{seq_len: 128, batch_size: 4, max_steps: 2, lr: 1.0e-3}}
package: {{formats: [adapter, merged, gguf], gguf_converter: {CONVERTER}, gguf_type: f32}}
serve: {{max_tokens: 6, models: [tuned], ui: false}}
"""
    )
    return path


def tree_texts(node: dict[str, Any]) -> list[str]:
    """Every message text of an oasst tree, depth first."""
    node = node.get("prompt", node)
    return [node["text"], *(t for reply in node.get("replies", []) for t in tree_texts(reply))]


def linear_layers(model: Any) -> list[str]:
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names - {"lm_head"})


@pytest.mark.slow
@needs_shared_data
@needs_gguf
@pytest.mark.parametrize("name", list(hubmodels.FAMILIES))
def test_a_family_builds_packages_and_serves_from_its_hub_id(
    name: str, offline_hub: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    home, commits = offline_hub
    family = hubmodels.FAMILIES[name]
    snapshot = hubmodels.snapshot_dir(home, family.repo, commits[name])
    path = family_recipe(tmp_path, family)
    build = api.load(path, cache_dir=tmp_path / "c")
    result = api.apply(build)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    lock = json.loads((tmp_path / "r.yaml.lock").read_text())
    assert lock["hub"] == {f"model:{family.repo}@main": commits[name]}

    # LoRA: PEFT's own targets for the model type, else every linear layer of the blocks
    base = AutoModelForCausalLM.from_pretrained(snapshot)
    targets = api.artifact(build, "train").manifest["metrics"]["lora_targets"]  # type: ignore[union-attr]
    expected = PEFT_TARGETS.get(base.config.model_type) or linear_layers(base)
    assert targets == sorted(expected), (name, targets)

    # the training text: the family's own template, rendered here by transformers from the snapshot
    tok = AutoTokenizer.from_pretrained(snapshot)
    assert not hubmodels.vectors_disagree(tok, family.checked_by)  # llama.cpp's own tokenizer test vectors
    rows = api.table(build, "format").to_pylist()
    turns = {r["id"]: r["turns"] for r in api.table(build, "source.s").to_pylist()}
    assert len(rows) >= 10
    for row in rows:
        messages = [{"role": t["role"], "content": t["text"]} for t in turns[row["id"]]]
        if family.template:
            prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            whole = tok.apply_chat_template(messages, tokenize=False)
            assert (row["prompt"], row["prompt"] + row["completion"]) == (prompt, whole)
        else:
            assert row["prompt"].endswith("<bot>:") and row["completion"] == f" {messages[-1]['content']}\n<human>:"

    # the GGUF: llama.cpp's converter recognises the tokenizer, and llama.cpp tokenizes real text as transformers does
    package = api.artifact(build, "package")
    assert package is not None
    gguf = package.file("model-f32.gguf")
    adapter = package.file("adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (family.repo, commits[name])
    if name == "mistral":  # the packaged adapter loads alone: PEFT finds its base by hub id and commit, cached
        from peft import AutoPeftModelForCausalLM

        alone = AutoPeftModelForCausalLM.from_pretrained(adapter)
        assert type(alone).__name__ == "PeftModelForCausalLM" and alone.peft_config["default"].revision == commits[name]
    facts = package.manifest["metrics"]["gguf"]
    assert facts["llama_cpp_check"] == "ran" and facts["tokenizer_agrees"], facts
    assert facts["greedy_agreement"] >= 0.9, facts
    from runner.steps.quiet import llama_cpp_quiet

    llm = llama_cpp_quiet().Llama(model_path=str(gguf), n_ctx=64, vocab_only=True, verbose=False)
    assert llm.metadata.get("tokenizer.ggml.pre", "default") == PRE_TOKENIZER[name]
    texts = list(dict.fromkeys(t for tree in OASST.read_text().splitlines() for t in tree_texts(json.loads(tree))))[
        :100
    ]
    differ = [
        t
        for t in texts
        if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t, add_special_tokens=False)
    ]
    assert not differ, (name, len(differ), differ[:2])

    # serving: the prompt is the template's, and every end token the model declares ends an answer
    from runner.serve.app import create_app
    from runner.serve.load import load_models

    models = load_models(build, ["tuned"])
    engine = models["fam-tuned"]
    app = create_app(models, build.loaded.recipe.serve)
    declared = GenerationConfig.from_pretrained(snapshot).eos_token_id
    ends = set(declared if isinstance(declared, list) else [declared]) | {tok.eos_token_id}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with TestClient(app) as client:
        answer = client.post("/v1/chat/completions", json={"model": "fam-tuned", "messages": messages, "max_tokens": 6})
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    if family.template:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in transformers 5
        assert usage["prompt_tokens"] == len(ids)
    assert 1 <= usage["completion_tokens"] <= 6
    assert engine.codec.ends == ends and (name != "llama3" or len(ends) == 3)


@pytest.mark.slow
@needs_shared_data
@pytest.mark.parametrize("name", [n for n, f in hubmodels.FAMILIES.items() if f.template])
def test_every_assistant_turn_is_learnt_as_the_template_renders_it(
    name: str, offline_hub: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """On 50 real multi-turn oasst conversations, the tokens `tokenize` learns are exactly each assistant turn as
    the family's template renders it: the token ids of transformers' `apply_chat_template` of the whole conversation
    from the end of its rendering up to the turn's generation prompt to where its rendering up to the turn parts
    from the whole (Phi-3.5 closes a conversation with an end-of-text its turns do not have)."""
    from transformers import AutoTokenizer

    home, commits = offline_hub
    family = hubmodels.FAMILIES[name]
    build = chat_tokens(
        tmp_path,
        family.repo,
        f"  sources: [{{name: s, format: oasst, path: {OASST}, lang: [en]}}]\n"
        '  filters: [{kind: sql, where: "len(turns) >= 4"}, {kind: limit, n: 50}]\n',
    )
    tok = AutoTokenizer.from_pretrained(hubmodels.snapshot_dir(home, family.repo, commits[name]))
    turns = {r["id"]: r["turns"] for r in api.table(build, "source.s").to_pylist()}
    rows = api.table(build, "split", "train").to_pylist()
    examples = api.table(build, "tokenize", "train").to_pylist()
    assert len(rows) == len(examples) == 50
    earlier = 0
    for row, example in zip(rows, examples, strict=True):
        messages = [{"role": t["role"], "content": t["text"]} for t in turns[row["id"]]]
        whole = ids_of(tok.apply_chat_template(messages, tokenize=True))
        expected = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = ids_of(tok.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
            upto = ids_of(tok.apply_chat_template(messages[: i + 1], tokenize=True))
            assert whole[: len(before)] == before
            # the turn as the whole conversation has it: up to where its own rendering parts from the whole
            end = next(
                (n for n, (a, b) in enumerate(zip(upto, whole, strict=False)) if a != b), min(len(upto), len(whole))
            )
            expected += whole[len(before) : end]
            earlier += i < len(messages) - 1
        learnt = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
        assert learnt == expected, (name, row["id"])
        assert example["input_ids"] == whole
    assert earlier >= 50  # every conversation has an assistant turn before its last


def ids_of(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# an answer calling get_weather in the format each family's template teaches (Mistral's [TOOL_CALLS] is a special
# token that decoding drops: the answer is the bare list)
TOOL_ANSWERS = {
    "qwen2.5": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
}


class Scripted:
    """A served model that answers every prompt with one text (what a model trained on tool calls would say), and
    records the prompts; everything else about serving is runner's."""

    kind = "transformers"
    supports = frozenset({"temperature", "top_p", "seed", "stop", "logprobs", "min_tokens", "echo"})

    def __init__(self, codec: Any, answer: str) -> None:
        self.name, self.precision, self.codec, self.answer = "m", "fp32", codec, answer
        self.prompts: list[str] = []

    def generate_all(self, jobs: list[tuple[Any, Any]]) -> list[Any]:
        from runner.serve.engine import Output

        self.prompts += [p for p, _ in jobs]
        return [Output(self.answer, len(self.codec.encode(p, 8)), 5, "stop") for p, _ in jobs]


@pytest.mark.parametrize("name", [*TOOL_ANSWERS, "phi3", "falcon"])
def test_tools_render_through_the_template_and_calls_come_back_as_tool_calls(
    name: str, family_hub: tuple[Path, dict[str, str]]
) -> None:
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.codec import Codec

    home, commits = family_hub
    family = hubmodels.FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(hubmodels.snapshot_dir(home, family.repo, commits[name]))
    engine = Scripted(Codec("chat" if family.template else "human_bot", tok), TOOL_ANSWERS.get(name, "Sunny."))
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    with TestClient(create_app({"m": engine}, ServeConfig(ui=False))) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "tools": [WEATHER]})
        if name not in TOOL_ANSWERS:  # Phi-3.5's template takes no tools, Falcon has no template: refused by name
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text
            return
        assert r.status_code == 200, r.text
        assert engine.prompts[-1] == tok.apply_chat_template(
            messages, tools=[WEATHER], add_generation_prompt=True, tokenize=False
        )
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert choice["message"]["content"] == ("Let me look." if name == "qwen2.5" else None)

        # the call and its result go back: the template renders them as the family's own turns
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 18}'},
        ]
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "tools": [WEATHER]})
        assert r.status_code == 200, r.text
        rendered = [
            {**m, "content": m["content"] or ""}
            if m["role"] != "assistant"
            else {
                "role": "assistant",
                "content": "",
                "tool_calls": [{**call, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            }
            for m in messages
        ]
        assert engine.prompts[-1] == tok.apply_chat_template(
            rendered, tools=[WEATHER], add_generation_prompt=True, tokenize=False
        )
        assert "temperature" in engine.prompts[-1] and "get_weather" in engine.prompts[-1]


GLAIVE = SHARED_DATA / "instruct" / "glaive_toolcall_en_demo.sharegpt.json"


@pytest.mark.slow
@needs_shared_data
@pytest.mark.parametrize("name", ["qwen2.5", "llama3", "phi3"])
def test_rows_with_tools_render_through_the_family_template_and_train(
    name: str, offline_hub: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Real glaive tool-calling conversations (ShareGPT): a template that takes `tools` gets them as such (Qwen2.5,
    Llama 3.2), one that does not gets runner's schema line as its system message (Phi-3.5); every row trains."""
    from transformers import AutoTokenizer

    from runner.steps.prompts import TOOLS_LINE

    home, commits = offline_hub
    family = hubmodels.FAMILIES[name]
    records = json.loads(GLAIVE.read_text())[:30]
    (tmp_path / "g.json").write_text(json.dumps(records))
    build = chat_tokens(
        tmp_path, family.repo, f"  sources: [{{name: g, format: sharegpt, path: {tmp_path / 'g.json'}}}]\n"
    )
    tok = AutoTokenizer.from_pretrained(hubmodels.snapshot_dir(home, family.repo, commits[name]))
    source = {r["id"]: r for r in api.table(build, "source.g").to_pylist()}
    rows = api.table(build, "format").to_pylist()
    offered = 0
    for row in rows:
        src = source[row["id"]]
        messages = [{"role": t["role"], "content": t["text"]} for t in src["turns"]][:-1]
        tools = json.loads(src["tools"]) if src["tools"] else []
        offered += bool(tools)
        if name == "phi3" and tools:  # no tools in Phi-3.5's template: the schemas open the system message
            messages = [{"role": "system", "content": TOOLS_LINE + src["tools"]}, *messages]
            tools = []
        expected = tok.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True, tokenize=False)
        assert row["prompt"] == expected, (name, row["id"])
    assert len(rows) == 30 and offered == sum(bool(json.loads(r.get("tools") or "[]")) for r in records) > 10
    examples = api.table(build, "tokenize", "train").to_pylist()
    assert len(examples) == 30 and all(any(x != -100 for x in e["labels"]) for e in examples)


@pytest.mark.parametrize("name", ["falcon", "gpt_neox"])
def test_a_base_without_a_chat_template_is_refused_naming_the_choices(
    name: str, offline_hub: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        f"data:\n  sources: [{{name: s, format: oasst, path: {OASST}, limit: 3}}]\n  prompt: {{template: chat}}\n"
        f"model:\n  base: {hubmodels.FAMILIES[name].repo}\n"
    )
    result = api.apply(api.load(path, cache_dir=tmp_path / "c", targets=["format"]))
    (failed,) = [s for s in result.steps if s.state == "failed"]
    assert failed.name == "format" and "the base model's tokenizer has no chat template" in str(failed.error)
    assert "human_bot (h2oGPT's) or plain" in str(failed.error) and "data.prompt.tokenizer" in str(failed.error)
