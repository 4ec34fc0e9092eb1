"""`package: gguf` with llama.cpp's own converter and runtime: every from_config architecture and the quickstart
model convert, llama.cpp loads the file, and its greedy tokens equal transformers'.

Needs the `gguf` extra (llama-cpp-python, built from source) and llama.cpp's converter, which ships in
llama-cpp-python's source distribution: `.ci/run` installs both and sets RUNNER_GGUF_CONVERTER."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from runner import api
from runner.steps.gguf import read_gguf
from tests.conftest import ROOT, tiny_model_recipe

CONVERTER = os.environ.get("RUNNER_GGUF_CONVERTER", "")
pytestmark = pytest.mark.skipif(
    not (CONVERTER and Path(CONVERTER).is_file() and __import__("importlib").util.find_spec("llama_cpp")),
    reason="needs `pip install -e .[gguf]` and RUNNER_GGUF_CONVERTER (see .ci/run)",
)


def tiny(tmp_path: Path, arch: str, kind: str) -> Path:
    path = tmp_path / "t.yaml"
    path.write_text(
        tiny_model_recipe(
            arch=arch,
            # every linear layer: near-ties (random weights) stay rare after 8 steps, as the thresholds assume
            rest="lora: {rank: 8, target_modules: all-linear}\ntrain: {seq_len: 64, batch_size: 8, lr: 5.0e-3, max_steps: 8}\n"
            f"package: {{formats: [gguf], gguf_converter: {CONVERTER}, gguf_type: {kind}}}\n",
        )
    )
    return path


def quickstart(tmp_path: Path, kind: str) -> Path:
    shutil.copytree(ROOT / "recipes", tmp_path, dirs_exist_ok=True)
    path = tmp_path / "quickstart.yaml"
    path.write_text(
        path.read_text() + f"package: {{formats: [gguf], gguf_converter: {CONVERTER}, gguf_type: {kind}}}\n"
    )
    return path


def llama_greedy(gguf: Path, prompt: str, n: int) -> list[int]:
    """llama.cpp alone: its own tokenizer, its own sampler at temperature 0."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False)
    out = []
    for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False, special=True), top_k=1, temp=0.0):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


def hf_greedy(model_dir: Path, prompt: str, n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.slow
# each family with its real tokenizer: tests/test_families.py; here the quickstart's own (trained) tokenizer, at f16
@pytest.mark.parametrize("arch", ["quickstart"])
def test_gguf_runs_in_llama_cpp_as_in_transformers(tmp_path: Path, arch: str) -> None:
    path = quickstart(tmp_path, "f16") if arch == "quickstart" else tiny(tmp_path, arch, "f16")
    overrides = ["train.max_steps=40"] if arch == "quickstart" else []
    b = api.load(path, cache_dir=tmp_path / "c", overrides=overrides)
    result = api.apply(b)
    assert result.ok, [(s.name, s.error) for s in result.steps if s.error]
    pkg = api.artifact(b, "package")
    facts = pkg.manifest["metrics"]["gguf"]
    assert facts["llama_cpp_check"] == "ran" and facts["tokenizer_agrees"] and facts["greedy_agreement"] == 1.0
    assert "F16" in facts["tensor_types"] and facts["tensors"] > 10
    # runner reads the header as gguf-py does
    sys.path.insert(0, str(Path(CONVERTER).parent / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(pkg.file(facts["file"])))
    metadata, tensors = read_gguf(pkg.file(facts["file"]))
    assert tensors == [(t.name, int(t.tensor_type)) for t in reader.tensors]
    assert metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    merged = api.artifact(b, "merge").file("model")
    for prompt in ("<human>: What is the capital of France?\n<bot>:", "<human>: How do I bake bread?\n<bot>:"):
        assert llama_greedy(pkg.file("model-f16.gguf"), prompt, 12) == hf_greedy(merged, prompt, 12), prompt


@pytest.mark.slow
@pytest.mark.parametrize("kind, least", [("q8_0", 0.9), ("q4_K_M", 0.5)])
def test_quantized_gguf_mostly_agrees(tmp_path: Path, kind: str, least: float) -> None:
    b = api.load(tiny(tmp_path, "llama", kind), cache_dir=tmp_path / "c")
    assert api.apply(b).ok
    facts = api.artifact(b, "package").manifest["metrics"]["gguf"]
    assert facts["llama_cpp_check"] == "ran" and facts["greedy_agreement"] >= least
    assert {"q8_0": "Q8_0", "q4_K_M": "Q4_K"}[kind] in facts["tensor_types"]


@pytest.mark.slow
def test_llama_cpp_engine_behind_runners_server(tmp_path: Path) -> None:
    """serve.engine llama_cpp: the GGUF answers through runner's server with its auth and error shapes, greedy
    answers equal the merged model's under the transformers engine, streams equal whole answers, and both run
    on the server's one model thread (on a thread per request, 4 clients got 0.13-0.22x one client's tokens/s)."""
    import httpx
    from openai import BadRequestError, OpenAI

    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.engine import Sampling
    from runner.serve.load import load_models
    from tests.test_serving import start

    path = tiny(tmp_path, "llama", "f16")
    path.write_text(path.read_text() + "serve: {engine: llama_cpp, n_ctx: 256, token_env: T}\n")
    b = api.load(path, cache_dir=tmp_path / "c")
    assert api.apply(b).ok
    models = load_models(b, [])
    assert list(models) == ["t-gguf"] and getattr(models["t-gguf"], "batcher", None) is None
    reference = load_models(
        api.load(path, cache_dir=tmp_path / "c", overrides=["serve.engine=transformers"]), ["merged"]
    )["t-merged"]
    llm = models["t-gguf"].llm
    threads: set[str] = set()  # where llama.cpp runs: its CPU threads are an OpenMP team per calling thread
    llm_generate = llm.generate

    def generate(*args: Any, **kw: Any) -> Any:
        threads.add(threading.current_thread().name)
        return llm_generate(*args, **kw)

    llm.generate = generate
    # one request at a time: llama.cpp's own generate (test_llama_cpp_batches_... has the batched path)
    url, srv = start(create_app(models, ServeConfig(max_tokens=64, batch_size=1), token="secret"))
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        client = OpenAI(base_url=f"{url}/v1", api_key="secret")
        for question in ("What is the capital of France?", "How do I bake bread?"):
            messages = [{"role": "user", "content": question}]
            want = reference.generate_all([(reference.codec.prompt(messages), Sampling(max_tokens=12, min_tokens=12))])[
                0
            ]
            got = client.chat.completions.create(
                model="t-gguf", messages=messages, max_tokens=12, extra_body={"min_tokens": 12}
            )
            assert got.choices[0].message.content == want.text and got.usage.completion_tokens == want.completion_tokens
            streamed = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="t-gguf", messages=messages, max_tokens=12, stream=True, extra_body={"min_tokens": 12}
                )
            )
            assert streamed == want.text
        assert len(threads) == 1 and next(iter(threads)).startswith("runner-model"), threads  # whole and streamed
        with pytest.raises(BadRequestError) as err:
            client.chat.completions.create(model="t-gguf", messages=[{"role": "user", "content": "hi"}], logprobs=True)
        assert "logprobs" in str(err.value)
        with pytest.raises(BadRequestError) as err:
            client.completions.create(model="t-gguf", prompt="word " * 400, max_tokens=8)
        assert err.value.code == "context_length_exceeded"
    finally:
        srv.should_exit = True  # type: ignore[attr-defined]


@pytest.mark.slow
def test_llama_cpp_batches_sequences_and_answers_as_alone(tmp_path: Path) -> None:
    """With a batcher, concurrent requests are sequences of one llama.cpp context decoded together, and each
    greedy answer equals the one llama.cpp gives it alone; requests join a running batch, a cancelled stream
    frees its sequence, and every decode runs on the model thread."""
    from concurrent.futures import ThreadPoolExecutor

    from runner.serve.engine import Sampling
    from runner.serve.load import load_models

    path = tmp_path / "t.yaml"  # the plain template: no stop strings, so each answer runs to its length
    path.write_text(
        tiny_model_recipe(
            arch="llama",
            data="  prompt: {template: plain}\n",
            rest="lora: {rank: 8}\ntrain: {seq_len: 64, batch_size: 8, lr: 5.0e-3, max_steps: 8}\n"
            f"package: {{formats: [gguf], gguf_converter: {CONVERTER}, gguf_type: f16}}\n"
            "serve: {engine: llama_cpp, n_ctx: 256}\n",
        )
    )
    b = api.load(path, cache_dir=tmp_path / "c")
    assert api.apply(b).ok
    model = load_models(b, [])["t-gguf"]
    questions = [
        "What is the capital of France?",
        "How do I bake bread?",
        "Name a colour.",
        "hi",
        "Tell me a story about a cat and a dog who lived in a small house by the sea.",
    ]
    jobs = [
        (model.codec.prompt([{"role": "user", "content": q}]), Sampling(max_tokens=24 + 4 * i, min_tokens=24 + 4 * i))
        for i, q in enumerate(questions)
    ]
    alone = model.generate_all(jobs)
    assert all(a.completion_tokens == 24 + 4 * i for i, a in enumerate(alone))

    model.attach_batcher(4, 0.05)
    batcher = model.batcher
    threads: set[str] = set()
    decode = batcher._decode

    def counted(tokens: Any) -> Any:
        threads.add(threading.current_thread().name)
        return decode(tokens)

    batcher._decode = counted  # type: ignore[method-assign]
    assert model.generate_all(jobs) == alone  # five requests, four sequences: the fifth joins a running batch
    assert batcher.largest == 4 and batcher.joined_running >= 1
    with ThreadPoolExecutor(5) as pool:  # one request per thread, arriving as they may
        assert list(pool.map(lambda job: model.generate_all([job])[0], jobs)) == alone
    assert len(threads) == 1 and next(iter(threads)).startswith("runner-model"), threads
    # a stream cancelled after three tokens leaves; its sequence is free for the next request
    import queue

    got: queue.Queue[Any] = queue.Queue()
    cancel = threading.Event()
    ids = model.codec.encode(jobs[0][0], 200)
    model.start(ids, Sampling(max_tokens=200, min_tokens=200), cancel, got.put)
    tokens = [got.get(timeout=30) for _ in range(3)]
    cancel.set()
    while (item := got.get(timeout=30)) is not None:
        tokens.append(item)
    assert 3 <= len(tokens) < 200
    assert sorted(batcher.free) == [0, 1, 2, 3] and not batcher.seq
    assert model.generate_all(jobs[:2]) == alone[:2]
