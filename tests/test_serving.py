"""The OpenAI-compatible server on loopback, with a real HTTP client and the official openai client."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner import api
from tests.conftest import ROOT, needs_shared_data, tiny_model_recipe

TOKEN = "s3cret"
SERVED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    work = tmp_path_factory.mktemp("serve")
    (work / "docs").mkdir()
    (work / "docs" / "rivers.md").write_text(
        "The Nile is the longest river in Africa and flows into the Mediterranean Sea."
    )
    (work / "docs" / "bread.md").write_text("Bread is baked from flour, water, yeast and salt.")
    (work / "r.yaml").write_text(
        tiny_model_recipe(
            head="name: tiny\n",
            # every linear layer: the model these tests know (it ends "Hello" at once, says no stop string soon)
            rest="lora: {target_modules: all-linear}\n"
            "train: {seq_len: 64, batch_size: 8, lr: 5.0e-3, max_steps: 20, seed: 1}\n"
            "index:\n  documents: [{path: docs}]\n"
            "serve: {max_tokens: 32, max_body_bytes: 4096, top_k: 1, models: [tuned, base]}\n",
        )
    )
    build = api.load(work / "r.yaml", cache_dir=work / "cache")
    assert api.apply(build).ok
    app, _ = api.serve_app([build], token=TOKEN)
    SERVED["recipe"] = work / "r.yaml"
    SERVED["cache"] = work / "cache"
    from runner.cli.serve import listen

    sock = listen("127.0.0.1", 0)  # as `runner serve` listens (TCP_NODELAY on every connection)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def chat_body(**extra: object) -> dict:
    return {
        "model": "tiny-tuned",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        **extra,
    }


def test_models_lists_the_tuned_model_and_document_chat(server: str) -> None:
    r = httpx.get(f"{server}/v1/models", headers=auth())
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == [
        "tiny-tuned",
        "tiny-base",
        "tiny-tuned+docs",
        "tiny-base+docs",
        "all-MiniLM-L6-v2",
    ]


def test_two_models_side_by_side(server: str) -> None:
    tuned = httpx.post(f"{server}/v1/chat/completions", json=chat_body(), headers=auth(), timeout=60).json()
    base = httpx.post(
        f"{server}/v1/chat/completions", json=chat_body(model="tiny-base"), headers=auth(), timeout=60
    ).json()
    assert tuned["model"] == "tiny-tuned" and base["model"] == "tiny-base"
    assert all(isinstance(r["choices"][0]["message"]["content"], str) for r in (tuned, base))


def test_chat_streaming_matches_non_streaming(server: str) -> None:
    whole = httpx.post(f"{server}/v1/chat/completions", json=chat_body(), headers=auth(), timeout=60).json()
    text = whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] > 0 and whole["object"] == "chat.completion"
    pieces = []
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json=chat_body(stream=True), headers=auth(), timeout=60
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        delta = json.loads(line[6:])["choices"][0]["delta"]
        pieces.append(delta.get("content", ""))
    assert "".join(pieces).strip() == text.strip()


def test_the_openai_client_works(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=TOKEN)
    reply = client.chat.completions.create(
        model="tiny-tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert isinstance(reply.choices[0].message.content, str)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny-tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
        )
    )
    assert streamed.strip() == reply.choices[0].message.content.strip()
    done = client.completions.create(model="tiny-tuned", prompt="<human>: Hello\n<bot>: ", max_tokens=8)
    assert isinstance(done.choices[0].text, str)
    emb = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a river", "some bread"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384


def test_document_chat_returns_its_sources(server: str) -> None:
    body = {
        "model": "tiny-tuned+docs",
        "messages": [{"role": "user", "content": "Which river is longest in Africa?"}],
        "max_tokens": 8,
    }
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60).json()
    assert r["sources"][0]["document"] == "docs/rivers.md" and "Nile" in r["sources"][0]["text"]


def test_bad_requests_get_json_errors(server: str) -> None:
    r = httpx.post(
        f"{server}/v1/chat/completions", content=b"{not json", headers={**auth(), "content-type": "application/json"}
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{server}/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{server}/v1/chat/completions", json=chat_body())
    assert r.status_code == 401
    big = chat_body(messages=[{"role": "user", "content": "x" * 10_000}])
    r = httpx.post(f"{server}/v1/chat/completions", json=big, headers=auth())
    assert r.status_code == 413
    r = httpx.post(f"{server}/v1/chat/completions", json=chat_body(max_tokens=10_000), headers=auth())
    assert r.status_code == 400 and "limit of 32" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/v1/chat/completions", json=chat_body(model="nope"), headers=auth())
    assert r.status_code == 404
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny-tuned"}, headers=auth())
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    # the server is still fine
    assert httpx.get(f"{server}/v1/models", headers=auth()).status_code == 200


def test_concurrent_requests_are_all_served(server: str) -> None:
    def one(i: int) -> int:
        body = chat_body(messages=[{"role": "user", "content": f"Question {i}?"}], stream=i % 2 == 0)
        return httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=120).status_code

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(one, range(12))) == [200] * 12


def test_serving_an_unbuilt_recipe_is_a_clear_error(tmp_path: Path) -> None:
    from runner.errors import RunnerError

    (tmp_path / "r.yaml").write_text(f"""
data:
  sources: [{{name: s, format: oasst, path: {ROOT / "recipes/data/sample.oasst.jsonl"}}}]
model:
  base: {{from_config: {{architecture: llama, hidden_size: 64, layers: 1, heads: 4}}}}
  tokenizer: {{train: {{vocab_size: 300}}}}
""")
    with pytest.raises(RunnerError, match="is not built"):
        api.serve_app([api.load(tmp_path / "r.yaml")])


def test_terminal_chat_carries_the_conversation(server: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "runner", "chat", str(SERVED["recipe"]), "--docs", "--max-tokens", "6"],
        input="Which river is longest?\nAnd the second?\n/reset\n/quit\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "RUNNER_CACHE": str(SERVED["cache"])},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot>") == 2 and "docs/rivers.md" in proc.stdout


def spawn_chat(*args: str) -> Any:
    """`runner chat` on a pseudo-terminal, as a person at a terminal runs it."""
    import os
    import sys

    import pexpect

    env = {**os.environ, "RUNNER_CACHE": str(SERVED["cache"]), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    cmd = ["-m", "runner", "chat", str(SERVED["recipe"]), *args]

    def at_a_terminal() -> None:  # Ctrl-C interrupts, as at a terminal, even when the tests run in a background
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # job, which starts with SIGINT ignored (POSIX)

    return pexpect.spawn(
        sys.executable, cmd, env=env, encoding="utf-8", timeout=120, dimensions=(40, 120), preexec_fn=at_a_terminal
    )


def test_terminal_chat_keystroke_by_keystroke(server: str, tmp_path: Path) -> None:
    import pexpect

    chat = spawn_chat("--variant", "base", "--max-tokens", "400")
    chat.expect("you>")
    chat.send("Tell me everything\r")
    chat.expect(">:>:")  # the answer streams
    chat.sendintr()  # Ctrl-C: the answer stops, the chat goes on
    chat.expect("stopped")
    chat.expect("you>")
    chat.send("/help\r")  # a command, not a question
    chat.expect("/system")
    chat.expect("you>")
    chat.send("/system Answer briefly.\r")
    chat.expect("starts over")
    chat.send("abc\x1b[DX\r")  # left arrow, then X: line editing
    chat.expect("bot>")
    chat.expect("you>")
    chat.send("/nope\r")
    chat.expect("unknown command")
    chat.send("\x1b[A\x1b[A\r")  # up twice: the earlier line again (history)
    chat.expect("bot>")
    chat.expect("you>")
    saved = tmp_path / "conversation.json"
    chat.send(f"/save {saved}\r")
    chat.expect("saved 4 messages")
    chat.expect("you>")
    chat.sendintr()  # Ctrl-C at the prompt leaves
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0 and "interrupted" not in (chat.before or "")
    body = json.loads(saved.read_text())
    assert body["system"] == "Answer briefly." and body["model"] == "tiny-base"
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == ["abXc", "abXc"]
    answers = [m["content"] for m in body["messages"] if m["role"] == "assistant"]
    assert answers[0] == answers[1] and len(answers[0]) == 800, "greedy, 400 tokens of '>:'"

    stopped = spawn_chat("--variant", "base", "--max-tokens", "400")
    stopped.expect("you>")
    stopped.send("Tell me everything\r")
    stopped.expect(">:>:")
    stopped.sendintr()
    stopped.expect("you>")
    stopped.send(f"/save {saved}\r")
    stopped.expect("saved 2 messages")
    stopped.expect("you>")
    stopped.send("\x04")  # Ctrl-D leaves
    stopped.expect(pexpect.EOF)
    stopped.close()
    partial = json.loads(saved.read_text())["messages"][1]["content"]
    assert stopped.exitstatus == 0 and 0 < len(partial) < 800, "the stopped answer is kept as far as it went"


def test_a_conversation_becomes_one_prompt_with_its_history() -> None:
    from runner.serve.codec import Codec

    m = Codec("human_bot", None)
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert m.prompt(history) == "<human>: Hi\n<bot>: Hello!\n<human>: Capital of France?\n<bot>:"


def _oasst_texts() -> list[str]:
    from tests.conftest import SHARED_DATA

    texts: list[str] = []

    def walk(node: dict) -> None:
        texts.append(node["text"])
        for reply in node.get("replies", []):
            walk(reply)

    for line in (SHARED_DATA / "oasst" / "oasst2_openpaws_filtered.trees.jsonl").read_text().splitlines():
        walk(json.loads(line)["prompt"])
    return texts


def _tokenizers(texts: list[str]) -> dict[str, Any]:
    """Kinds of tokenizer a served model may have: byte-level BPE (runner's own, GPT-2/Falcon style),
    SentencePiece-style BPE with byte fallback (Llama style), WordPiece (BERT style); with and without the
    clean-up of spaces after decoding (many configs ask for it; transformers applies it only to non-BPE ones)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from runner.steps.embedding import model_dir

    byte = Tokenizer(models.BPE(unk_token=None))
    byte.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=special, initial_alphabet=alphabet)
    )
    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    fallback = [f"<0x{i:02X}>" for i in range(256)]
    sp.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "</s>", *fallback]))
    return {
        "byte-level": PreTrainedTokenizerFast(tokenizer_object=byte, eos_token="<|endoftext|>"),
        "byte-level, clean-up asked (BPE: ignored)": PreTrainedTokenizerFast(
            tokenizer_object=byte, eos_token="<|endoftext|>", clean_up_tokenization_spaces=True
        ),
        "byte-fallback": PreTrainedTokenizerFast(tokenizer_object=sp, eos_token="</s>", unk_token="<unk>"),
        "wordpiece": AutoTokenizer.from_pretrained(model_dir("all-MiniLM-L6-v2", {})),
        "wordpiece, spaces cleaned up": AutoTokenizer.from_pretrained(
            model_dir("all-MiniLM-L6-v2", {}), clean_up_tokenization_spaces=True
        ),
    }


@needs_shared_data
def test_streamed_pieces_are_the_decoded_answer() -> None:
    """A stream's pieces, joined, are what `tokenizer.decode` gives for the whole answer (special tokens skipped),
    on real multilingual answers (oasst: Chinese, Japanese, emoji, code) cut at any token, so also mid-character,
    for the tokenizer kinds served models have; and each piece comes as soon as its tokens have (whole lines when
    the tokenizer cleans up spaces, which can change text already decoded)."""
    import random

    from runner.serve.text import Pieces

    texts = _oasst_texts()
    rng = random.Random(7)
    for kind, tok in _tokenizers(texts).items():
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        for text in rng.sample(texts, 150):
            ids = tok(text, add_special_tokens=False)["input_ids"][: rng.randint(1, 120)]
            ids.insert(rng.randint(0, len(ids)), eos)  # a special token mid-answer is skipped, as decode skips it
            whole = tok.decode(ids, skip_special_tokens=True)
            so_far = whole.rstrip("\ufffd")  # mid-answer, a character not whole yet (U+FFFD) waits for the rest
            for ended in (False, True):
                pieces = Pieces(tok, [], threading.Event())
                streamed = "".join(pieces.feed(i) for i in ([*ids, None] if ended else ids))
                assert pieces.done == ended and pieces.cancel.is_set() == ended
                if ended:
                    assert streamed == whole, (kind, ids)
                elif kind == "wordpiece, spaces cleaned up":
                    assert streamed == whole[: whole.rfind("\n") + 1], (kind, ids)
                else:
                    assert streamed == so_far, (kind, ids)
                assert len(pieces.ids) == len(ids)


# -- real clients: cancellation, context limits, the OpenAI surface, hardening -------------------------


def start(app: object) -> tuple[str, object]:
    import uvicorn

    from runner.cli.serve import listen

    sock = listen("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", srv


@pytest.fixture(scope="module")
def long_server(server: str) -> Iterator[tuple[str, dict]]:
    """The same model behind a server with generous limits, made to never stop early (as a chatty model does)."""
    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.load import load_models

    build = api.load(SERVED["recipe"], cache_dir=SERVED["cache"])
    models = load_models(build, ["tuned"])
    model = models["tiny-tuned"]
    plain = model.generate_kwargs
    model.generate_kwargs = lambda s, cancel, start: {**plain(s, cancel, start), "min_new_tokens": s.max_tokens}  # type: ignore[method-assign]
    config = ServeConfig(
        max_tokens=1500, max_body_bytes=2_000_000, batch_size=1
    )  # no batcher: generate_kwargs is the path
    url, srv = start(create_app(models, config))
    yield url, models
    srv.should_exit = True  # type: ignore[attr-defined]


def test_a_client_that_disconnects_frees_the_model(long_server: tuple[str, dict]) -> None:
    url, models = long_server
    body = {
        "model": "tiny-tuned",
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 1500,
        "stream": True,
    }
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            events = [line for line in (next(lines) for _ in range(8)) if line.startswith("data:")]
            assert len(events) >= 3 and models["tiny-tuned"].lock.locked()
        started = time.perf_counter()  # the connection is closed here, mid-generation
        r = client.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 5})
        assert r.status_code == 200 and time.perf_counter() - started < 5
    deadline = time.time() + 2
    while models["tiny-tuned"].lock.locked() and time.time() < deadline:
        time.sleep(0.01)
    assert not models["tiny-tuned"].lock.locked()


def test_a_client_that_disconnects_leaves_the_batch(server: str) -> None:
    """A batched stream whose client hangs up mid-answer leaves the batch within a step (the server learns of it
    from the connection, not by asking at every token)."""
    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.load import load_models

    models = load_models(api.load(SERVED["recipe"], cache_dir=SERVED["cache"]), ["tuned"])
    url, srv = start(create_app(models, ServeConfig(max_tokens=1500, batch_size=8)))
    batcher = models["tiny-tuned"].batcher
    body = {"model": "tiny-tuned", "prompt": "Hello", "max_tokens": 1500, "min_tokens": 1500, "stream": True}
    try:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert sum(line.startswith("data:") for line in (next(lines) for _ in range(8))) >= 3
                assert batcher is not None and batcher.in_flight == 1
            closed = time.perf_counter()  # the connection is closed here, ~1,490 tokens (seconds of work) early
            while batcher.in_flight and time.perf_counter() - closed < 5:
                time.sleep(0.01)
            assert batcher.in_flight == 0 and time.perf_counter() - closed < 1, "it ran on after the client left"
            r = client.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 5, "min_tokens": 5})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        srv.should_exit = True  # type: ignore[attr-defined]


def test_prompt_length_is_checked_before_generating(long_server: tuple[str, dict]) -> None:
    url, models = long_server
    context = models["tiny-tuned"].codec.context
    assert context == 2048
    long = "word " * 9000
    for stream in (False, True):
        started = time.perf_counter()
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=60,
            json={
                "model": "tiny-tuned",
                "messages": [{"role": "user", "content": long}],
                "max_tokens": 10,
                "stream": stream,
            },
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "2048" in r.json()["error"]["message"] and time.perf_counter() - started < 5
    huge = "x" * 900_000
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-tuned", "prompt": huge, "max_tokens": 5}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    fits = httpx.post(f"{url}/v1/completions", json={"model": "tiny-tuned", "prompt": "Hello", "max_tokens": 2040})
    assert fits.status_code == 400, "prompt + max_tokens over the context is refused too"


def test_every_openai_parameter_is_implemented_or_refused(server: str, long_server: tuple[str, dict]) -> None:
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=TOKEN, max_retries=0)
    chatty = OpenAI(base_url=f"{long_server[0]}/v1", api_key="none", max_retries=0)  # a model that says something
    messages = [{"role": "user", "content": "Name a primary color."}]
    r = client.chat.completions.create(
        model="tiny-tuned", messages=messages, max_completion_tokens=6, n=3, temperature=1.0, top_p=0.9, seed=7
    )
    assert len(r.choices) == 3 and all(c.message.content is not None for c in r.choices)
    again = client.chat.completions.create(
        model="tiny-tuned", messages=messages, max_completion_tokens=6, n=3, temperature=1.0, top_p=0.9, seed=7
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices], "same seed, same text"
    assert r.usage.completion_tokens <= 18
    lp = chatty.chat.completions.create(
        model="tiny-tuned", messages=messages, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].logprob >= content[0].logprob - 1e-6, "greedy takes the most likely token"
    whole = chatty.completions.create(model="tiny-tuned", prompt="The capital of France is", max_tokens=12)
    text = whole.choices[0].text
    cut = text[len(text) // 2 :][:3]
    assert cut.strip()
    stopped = chatty.completions.create(
        model="tiny-tuned", prompt="The capital of France is", max_tokens=12, stop=[cut]
    )
    assert stopped.choices[0].text == text[: text.index(cut)].rstrip() and stopped.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            model="tiny-tuned", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    for extra, param in (
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
    ):
        with pytest.raises(BadRequestError) as err:
            client.chat.completions.create(model="tiny-tuned", messages=messages, max_tokens=4, **extra)
        assert param in str(err.value)
    r = httpx.post(f"{server}/v1/chat/completions", headers=auth(), json={**chat_body(), "frobnicate": 1})
    assert r.status_code == 400 and "frobnicate" in r.json()["error"]["message"]


def test_valid_openai_requests_are_accepted(server: str) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "user", "content": "So?"},
    ]
    r = httpx.post(
        f"{server}/v1/chat/completions",
        headers=auth(),
        json={"model": "tiny-tuned", "messages": messages, "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{server}/v1/completions",
        headers=auth(),
        json={"model": "tiny-tuned", "prompt": ["Hi", "Bye"], "max_tokens": 3},
    )
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == [0, 1]


def test_stream_and_whole_answers_agree(long_server: tuple[str, dict]) -> None:
    url, _ = long_server
    body = {"model": "tiny-tuned", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    text, finish = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content", "")
                finish = choice["finish_reason"] or finish
    assert whole["finish_reason"] == "length" == finish
    assert text == whole["message"]["content"]


def test_small_things_a_client_notices(server: str) -> None:
    r = httpx.get(f"{server}/v1/nowhere", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.get(f"{server}/v1/chat/completions", headers=auth())
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(f"{server}/openapi.json").status_code == 401, "no token, no schema"
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    r = httpx.post(
        f"{server}/v1/embeddings", headers=auth(), json={"model": "all-MiniLM-L6-v2", "input": ["a b c", "d"]}
    )
    assert r.json()["usage"]["prompt_tokens"] > 4
    r = httpx.post(
        f"{server}/v1/completions",
        headers=auth(),
        json={"model": "tiny-tuned+docs", "prompt": "Which river is longest?", "max_tokens": 3},
    )
    assert r.status_code == 200 and r.json()["sources"][0]["document"] == "docs/rivers.md"
    for body in (
        {"model": "tiny-tuned", "prompt": "", "max_tokens": 3},
        {"model": "tiny-tuned", "prompt": "Hi", "max_tokens": 3, "temperature": 1e-300},
    ):
        assert httpx.post(f"{server}/v1/completions", headers=auth(), json=body).status_code == 200


def test_a_busy_port_is_a_clear_error(cli) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    code, _, err = cli(
        "serve",
        str(SERVED["recipe"]),
        "--cache-dir",
        str(SERVED["cache"]),
        "--port",
        str(sock.getsockname()[1]),
        "--token",
        TOKEN,
    )
    sock.close()
    assert code == 1 and "is in use" in err


def test_an_index_only_recipe_serves_embeddings_and_search(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("Owls hunt at night.")
    (tmp_path / "docs" / "b.md").write_text("Bees make honey.")
    (tmp_path / "r.yaml").write_text("index:\n  documents: [{path: docs}]\n")
    build = api.load(tmp_path / "r.yaml")
    assert api.apply(build).ok
    app, _ = api.serve_app([build])
    url, srv = start(app)
    try:
        r = httpx.post(f"{url}/v1/search", json={"query": "what do bees make?", "k": 1})
        assert r.status_code == 200 and r.json()["data"][0]["doc_id"] == "docs/b.md"
        assert httpx.post(f"{url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x"}).status_code == 200
        assert httpx.post(f"{url}/v1/chat/completions", json=chat_body()).status_code == 404
    finally:
        srv.should_exit = True  # type: ignore[attr-defined]


def malformed_requests() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """Several hundred requests a careless or hostile client sends: (method, path, body, headers)."""
    import random

    rng = random.Random(11)
    good = chat_body(max_tokens=1)  # valid answers are not the point here: keep them short
    out: list[tuple[str, str, bytes, dict[str, str]]] = []
    values = [
        None,
        True,
        -1,
        0,
        1e308,
        -1e308,
        1e-300,
        "",
        "x" * 3000,
        [],
        {},
        [1, "a"],
        {"a": {"b": []}},
        "9" * 5000,
        2**70,
        float("nan") if False else "NaN",
    ]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/search"):
        for key in (
            "model",
            "messages",
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "stream",
            "logprobs",
            "top_logprobs",
            "prompt",
            "input",
            "query",
            "k",
            "stream_options",
            "response_format",
        ):
            for v in values:
                body = {**good, "prompt": "Hi", "input": "x", "query": "q", key: v}
                out.append(("POST", path, json.dumps(body).encode(), {}))
    out = rng.sample(out, 300)  # of the 1,088 field x value cases, a fixed sample keeps the test short
    out += [
        ("POST", "/v1/chat/completions", b, {})
        for b in (
            b"",
            b"{",
            b"[]",
            b"null",
            b"\xff\xfe",
            b'{"model": ' + b"[" * 10000 + b"]" * 10000 + b"}",
            b'{"model": "tiny-tuned", "max_tokens": ' + b"9" * 5000 + b"}",
            b'"text"',
            b"{}" * 100,
        )
    ]
    out += [
        ("POST", "/v1/chat/completions", json.dumps(good).encode(), {"content-type": ct})
        for ct in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
    ]
    out += [(m, "/v1/chat/completions", b"", {}) for m in ("GET", "PUT", "DELETE", "PATCH")]
    out += [
        ("GET", p, b"", {})
        for p in ("/", "/docs", "/v1", "/v1/models/../../etc/passwd", "/%00", "/v1/models?x=" + "a" * 5000)
    ]
    for _ in range(60):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        out.append(("POST", rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), junk, {}))
    return out


def test_fuzzed_requests_get_json_errors_and_the_server_stays_up(server: str) -> None:
    cases = malformed_requests()
    assert len(cases) >= 300
    with httpx.Client(timeout=60) as client:
        for method, path, body, headers in cases:
            r = client.request(method, f"{server}{path}", content=body, headers={**auth(), **headers})
            assert r.status_code != 500, (method, path, body[:200], r.text[:300])
            assert "root:x:0:0" not in r.text
            if not r.url.path.startswith("/v1"):  # the chat page's paths (the ui extra): test_ui.py
                continue
            payload = r.json()
            if r.status_code >= 400:
                assert set(payload["error"]) >= {"message", "type", "code"}, (path, body[:100], payload)
        # a chunked body over the limit stops at the limit
        r = client.post(f"{server}/v1/chat/completions", content=(b"x" * 1000 for _ in range(100)), headers=auth())
        assert r.status_code == 413 and r.json()["error"]["code"] == 413
        r = client.post(f"{server}/v1/chat/completions", json=chat_body(), headers=auth())
        assert r.status_code == 200 and r.json()["choices"]


def test_concurrent_greedy_requests_are_batched_and_answer_as_alone(server: str) -> None:
    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.engine import Sampling
    from runner.serve.load import load_models

    build = api.load(SERVED["recipe"], cache_dir=SERVED["cache"])
    models = load_models(build, ["tuned"])
    model = models["tiny-tuned"]
    prompts = ["The Nile", "Bread is", "Paris is the", "A spider has", "Cats", "Rockets", "Seven times", "Hello"]
    alone = [model.generate(p, Sampling(max_tokens=12)) for p in prompts]  # no batcher yet: one at a time
    url, srv = start(create_app(models, ServeConfig(max_tokens=32, batch_size=8, batch_wait_ms=50)))
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda p: httpx.post(
                        f"{url}/v1/completions", timeout=60, json={"model": "tiny-tuned", "prompt": p, "max_tokens": 12}
                    ).json()["choices"][0],
                    prompts,
                )
            )
    finally:
        srv.should_exit = True  # type: ignore[attr-defined]
    assert model.batcher is not None and model.batcher.largest > 1, "requests that arrived together ran together"
    assert [a["text"] for a in answers] == [o.text for o in alone]
    assert [a["finish_reason"] for a in answers] == [o.finish_reason for o in alone]


def test_min_tokens_holds_off_the_end_of_text(server: str) -> None:
    body = {"model": "tiny-tuned", "prompt": "Hello", "max_tokens": 12, "min_tokens": 12}
    r = httpx.post(f"{server}/v1/completions", headers=auth(), json=body, timeout=60).json()
    plain = httpx.post(f"{server}/v1/completions", headers=auth(), json={**body, "min_tokens": 0}, timeout=60).json()
    assert plain["usage"]["completion_tokens"] == 1, "this tiny model ends its answer at once"
    assert r["usage"]["completion_tokens"] == 12 and r["choices"][0]["finish_reason"] == "length"
    r = httpx.post(f"{server}/v1/completions", headers=auth(), json={**body, "min_tokens": 13}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_requests_joining_a_running_batch_get_what_they_would_alone(server: str) -> None:
    """Continuous batching: requests of different lengths arrive while others generate, join between token steps,
    and leave when done; each answer is the one it gets alone, token for token."""
    import random

    from runner.serve.batcher import Batcher
    from runner.serve.engine import Sampling
    from runner.serve.load import load_models

    build = api.load(SERVED["recipe"], cache_dir=SERVED["cache"])
    model = load_models(build, ["tuned"])["tiny-tuned"]
    rng = random.Random(7)
    words = [w for w in (ROOT / "recipes" / "data" / "sample.oasst.jsonl").read_text().split() if w.isalpha()]
    jobs = [
        (" ".join(rng.choices(words, k=rng.randint(1, 40))), rng.randint(1, 30), rng.randint(0, 30)) for _ in range(24)
    ]
    samplings = [Sampling(max_tokens=n, min_tokens=min(n, m)) for _, n, m in jobs]
    alone = [model.generate(p, s) for (p, _, _), s in zip(jobs, samplings, strict=False)]
    assert len({o.completion_tokens for o in alone}) > 5, "answers of many lengths"
    batcher = Batcher(model, size=6, wait=0.0)

    def ask(i: int) -> Any:
        time.sleep(0.02 * i)  # staggered: most arrive while others are generating
        return batcher.submit([(model.codec.encode(jobs[i][0], jobs[i][1]), samplings[i])])[0]

    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(ask, range(len(jobs))))
    assert batcher.joined_running > 5 and batcher.largest > 1
    for a, b in zip(together, alone, strict=False):
        assert (a.text, a.completion_tokens, a.finish_reason) == (b.text, b.completion_tokens, b.finish_reason)


def test_streams_and_whole_answers_share_the_batch(server: str) -> None:
    """Greedy streams run in the batch beside whole answers: each stream's text is its whole answer alone, and a
    stream abandoned halfway leaves the batch (the others still finish)."""
    from runner.serve.batcher import Batcher
    from runner.serve.engine import Sampling, stream
    from runner.serve.load import load_models

    build = api.load(SERVED["recipe"], cache_dir=SERVED["cache"])
    model = load_models(build, ["tuned"])["tiny-tuned"]
    prompts = ["The Nile", "Bread is made of", "Paris", "A spider has eight", "Cats and dogs", "Hello there"]
    samplings = [Sampling(max_tokens=10 + 3 * i, min_tokens=5 + 3 * i) for i in range(len(prompts))]
    alone = [model.generate(p, s) for p, s in zip(prompts, samplings, strict=False)]
    model.batcher = Batcher(model, size=8, wait=0.0)

    def ask(i: int) -> Any:
        time.sleep(0.01 * i)
        if i % 2:
            return model.generate(prompts[i], samplings[i])
        done: dict[str, Any] = {}
        return "".join(stream(model, prompts[i], samplings[i], done=done)), done

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert model.batcher.largest > 1
    for i, (g, a) in enumerate(zip(got, alone, strict=False)):
        if i % 2:
            assert (g.text, g.completion_tokens) == (a.text, a.completion_tokens)
        else:
            text, done = g
            assert (text, done["completion_tokens"], done["finish_reason"]) == (
                a.text,
                a.completion_tokens,
                a.finish_reason,
            )
    answer = stream(model, "The Nile", Sampling(max_tokens=200, min_tokens=200))
    next(answer)
    answer.close()  # a client gone: the request leaves the batch within a step
    deadline = time.time() + 5
    while model.batcher.in_flight and time.time() < deadline:
        time.sleep(0.01)
    assert model.batcher.in_flight == 0
    assert model.generate(prompts[1], samplings[1]).text == alone[1].text


def test_sampled_requests_share_the_batch_and_draw_as_generate_does(server: str) -> None:
    """Sampled requests (no seed) run in the batch beside greedy ones, which still answer as alone. Each token
    drawn there lies in the nucleus `generate(do_sample=True)` keeps at that step (its own processed scores for
    the same prefix), and the draw follows softmax(logits / temperature) cut to the top_p nucleus, checked by
    hand."""
    import collections
    import math
    import queue

    import torch

    from runner.serve.batcher import Batcher
    from runner.serve.batcher import sample_token as draw
    from runner.serve.engine import Sampling, stream
    from runner.serve.load import load_models

    build = api.load(SERVED["recipe"], cache_dir=SERVED["cache"])
    model = load_models(build, ["tuned"])["tiny-tuned"]
    prompt = "The Nile"
    ids = model.codec.encode(prompt, 6)
    sampled, greedy = Sampling(max_tokens=6, temperature=0.7, top_p=0.8, min_tokens=6), Sampling(max_tokens=6)
    alone = model.generate(prompt, greedy)

    def generate_probs(prefix: list[int]) -> Any:
        """What `generate` draws the next token after `prefix` from: its processed scores, softmaxed."""
        enc = torch.tensor([prefix])
        with torch.no_grad():
            out = model.model.generate(
                input_ids=enc,
                attention_mask=torch.ones_like(enc),
                max_new_tokens=1,
                min_new_tokens=1,  # as min_tokens holds the end-of-text token off
                do_sample=True,
                temperature=sampled.temperature,
                top_p=sampled.top_p,
                top_k=0,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=model.codec.tokenizer.pad_token_id,
            )
        return torch.softmax(out.scores[0][0].float(), dim=-1)

    model.batcher = Batcher(model, size=16, wait=0.05)
    jobs = [greedy if i % 5 == 0 else sampled for i in range(40)]

    def ask(i: int) -> Any:
        if i % 2:
            return model.generate(prompt, jobs[i]).text
        return "".join(stream(model, prompt, jobs[i]))

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, range(len(jobs))))
    assert model.batcher.largest > 8, "sampled requests ran in the batch (only 8 of the 40 are greedy)"
    assert all(a == alone.text for a, s in zip(answers, jobs, strict=False) if s is greedy)

    def drawn(s: Sampling) -> list[int]:  # the token ids of one answer from the batch
        got: queue.Queue[Any] = queue.Queue()
        model.start(ids, s, threading.Event(), got.put)
        return list(iter(got.get, None))

    # every drawn token is one generate could draw there, replayed on the same prefix
    with ThreadPoolExecutor(16) as pool:
        answers_ids = list(pool.map(lambda _: drawn(sampled), range(16)))
    assert model.batcher.largest == 16
    for new in answers_ids:
        for t, token in enumerate(new):
            assert generate_probs(ids + new[:t])[token] > 0, (new, t)
    # and the draw follows the distribution, worked out by hand on logits whose nucleus is small
    logits, t, top_p = [2.0, 1.0, 0.5, 0.0, -1.0], 0.7, 0.8
    probs = [math.exp(v / t) for v in logits]
    probs = [v / sum(probs) for v in probs]  # 0.700, 0.168, 0.082, ... (descending already)
    keep = next(k for k in range(1, 6) if sum(probs[:k]) >= top_p)  # the fewest tokens holding top_p of it
    expected = [v / sum(probs[:keep]) if i < keep else 0.0 for i, v in enumerate(probs)]
    torch.manual_seed(0)
    row = torch.tensor(logits)
    counts = collections.Counter(
        draw(row.clone(), Sampling(max_tokens=1, temperature=t, top_p=top_p)) for _ in range(20000)
    )
    assert keep == 2 and all(abs(counts[i] / 20000 - e) < 0.015 for i, e in enumerate(expected)), (counts, expected)


def test_a_requests_answers_share_the_batch(server: str) -> None:
    """A request's several answers (n, or several prompts) are asked of the batcher at once, so they share its
    token steps, each still the answer it gets alone; a prompt of token ids is one prompt, however long."""
    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.engine import Sampling
    from runner.serve.load import load_models

    build = api.load(SERVED["recipe"], cache_dir=SERVED["cache"])
    models = load_models(build, ["tuned"])
    model = models["tiny-tuned"]
    prompts = ["The Nile", "Bread is made of", "Paris"]
    alone = [model.generate(p, Sampling(max_tokens=8, min_tokens=8)).text for p in prompts]
    ids = model.codec.tokenizer("The Nile is the longest river in Africa, and it flows north", add_special_tokens=False)
    ids = ids["input_ids"]
    assert len(ids) > 8
    by_ids = model.generate(ids, Sampling(max_tokens=8, min_tokens=8)).text
    url, srv = start(create_app(models, ServeConfig(max_tokens=32, batch_size=8, batch_wait_ms=50)))
    try:
        body = {"model": "tiny-tuned", "max_tokens": 8, "min_tokens": 8}
        r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": prompts, "n": 2}, timeout=60).json()
        assert [c["text"] for c in r["choices"]] == [a for a in alone for _ in range(2)]
        assert model.batcher is not None and model.batcher.largest == 6
        r = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ids}, timeout=60)
        assert r.status_code == 200 and [c["text"] for c in r.json()["choices"]] == [by_ids], r.text
        sampled = {**body, "prompt": "The Nile", "n": 8, "temperature": 1.0}
        r = httpx.post(f"{url}/v1/completions", json=sampled, timeout=60).json()
        assert len(r["choices"]) == 8 and r["usage"]["completion_tokens"] == 64 and model.batcher.largest == 8
    finally:
        srv.should_exit = True  # type: ignore[attr-defined]


def test_every_generation_runs_on_the_one_model_thread(server: str) -> None:
    """torch runs an OpenMP team per calling thread: generating on a thread per request, or on several threads
    in turn, was 1.3x-2.3x slower on 2 cores. Whole answers and streams, greedy (batched) or sampled (alone),
    asked from many client threads, all run their forward passes on one thread."""
    import torch

    from runner.serve.batcher import Batcher
    from runner.serve.engine import Sampling, stream
    from runner.serve.load import load_models

    build = api.load(SERVED["recipe"], cache_dir=SERVED["cache"])
    model = load_models(build, ["tuned"])["tiny-tuned"]
    model.batcher = Batcher(model, size=4, wait=0.0)
    threads: set[str] = set()
    embeddings = [m for m in model.model.modules() if isinstance(m, torch.nn.Embedding)]  # every forward, any wrapper
    hooks = [m.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name)) for m in embeddings]
    greedy, sampled = Sampling(max_tokens=6, min_tokens=6), Sampling(max_tokens=6, temperature=1.0, seed=3)

    def ask(i: int) -> str:
        s = greedy if i % 2 else sampled
        if i % 4 < 2:
            return model.generate("The Nile", s).text
        return "".join(stream(model, "The Nile", s))

    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(16)))
    finally:
        for hook in hooks:
            hook.remove()
    assert embeddings and model.batcher.largest >= 1 and all(isinstance(a, str) for a in answers)
    assert len(threads) == 1 and next(iter(threads)).startswith("runner-model"), threads
    assert answers[1] == answers[3] == model.generate("The Nile", greedy).text  # batched, whole and streamed
    done: dict = {}
    streamed = "".join(stream(model, "The Nile", sampled, done=done))  # alone, as generate() runs it
    whole = model.generate("The Nile", sampled)
    assert answers[0] == answers[2] == streamed == whole.text
    assert done["completion_tokens"] == whole.completion_tokens and done["finish_reason"] == whole.finish_reason


def test_the_server_socket_sends_without_waiting_for_acks() -> None:
    """`runner serve`'s socket says TCP, so asyncio sets TCP_NODELAY on every connection: without it each
    response's second write waited for the client's delayed ACK (a trivial request took ~44 ms, not ~3 ms)."""
    import asyncio

    from runner.cli.serve import listen

    async def check() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        sock = listen("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
            return nodelay
        finally:
            server.close()

    assert asyncio.run(check()) != 0


def test_sigterm_after_dropped_streams_shuts_down(server: str) -> None:
    import os
    import signal
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "serve", str(SERVED["recipe"]), "--port", str(port), "--quiet"],
        cwd=ROOT,
        env={**os.environ, "RUNNER_CACHE": str(SERVED["cache"]), "RUNNER_SERVE_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", headers=auth()).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    for _ in range(3):  # streams dropped after the first event
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=chat_body(stream=True, max_tokens=32), headers=auth(), timeout=30
        ) as r:
            next(r.iter_lines())
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM did not stop the server") from None
    # uvicorn finishes in-flight work, then re-raises the signal it caught: exit by SIGTERM, promptly
    assert code in (0, -signal.SIGTERM), proc.stderr.read() if proc.stderr else ""


def test_echo_scores_prompt_tokens_as_a_forward_pass_does(server: str) -> None:
    """`echo` with `logprobs` (vLLM's way, which lm-evaluation-harness's local-completions reads): each prompt
    token's log-probability given the tokens before it, checked against the model's own forward pass; the first
    token has none. Prompts come as lists of token ids, used as they are."""
    import torch

    from runner.serve.load import load_models

    engine = load_models(api.load(SERVED["recipe"], cache_dir=SERVED["cache"]), ["tuned"])["tiny-tuned"]
    tok = engine.codec.tokenizer
    first = tok("The Nile is the longest river", add_special_tokens=False)["input_ids"]
    second = tok("Bread is made of flour", add_special_tokens=False)["input_ids"]
    want = []
    with torch.inference_mode():
        for ids in (first, second):
            lp = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            want.append([float(lp[i, t]) for i, t in enumerate(ids[1:])])
    body = {"model": "tiny-tuned", "prompt": [first, second], "echo": True, "logprobs": 1}
    r = httpx.post(f"{server}/v1/completions", headers=auth(), json={**body, "max_tokens": 0}, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    for c, ids, expected in zip(choices, (first, second), want, strict=True):
        lp = c["logprobs"]
        assert c["text"] == tok.decode(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
        for token, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= token - 1e-6
    assert r.json()["usage"] == {"prompt_tokens": len(first) + len(second), "completion_tokens": 0,
                                 "total_tokens": len(first) + len(second)}  # fmt: skip
    one = httpx.post(f"{server}/v1/completions", headers=auth(), json={**body, "max_tokens": 1}, timeout=60).json()
    for c, ids, expected in zip(one["choices"], (first, second), want, strict=True):
        assert len(c["logprobs"]["token_logprobs"]) == len(ids) + 1  # the prompt's, then the generated token's
        assert c["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-5)
        assert c["text"].startswith(tok.decode(ids))
    for prompt, message in (([[1, 2], [10**7]], "not in this model's vocabulary"), ([[]], "empty")):
        r = httpx.post(f"{server}/v1/completions", headers=auth(), json={**body, "prompt": prompt}, timeout=60)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
