"""The OpenAI-compatible server on loopback, with a real HTTP client and the official openai client."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from runner import api
from tests.conftest import ROOT

TOKEN = "s3cret"
SERVED: dict[str, Path] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    work = tmp_path_factory.mktemp("serve")
    (work / "docs").mkdir()
    (work / "docs" / "rivers.md").write_text("The Nile is the longest river in Africa and flows into the Mediterranean Sea.")
    (work / "docs" / "bread.md").write_text("Bread is baked from flour, water, yeast and salt.")
    (work / "r.yaml").write_text(f"""
name: tiny
data:
  sources: [{{name: s, format: oasst, path: {ROOT / 'recipes/data/sample.oasst.jsonl'}, lang: [en]}}]
model:
  base: {{from_config: {{architecture: falcon, hidden_size: 64, layers: 2, heads: 4, seed: 0}}}}
  tokenizer: {{train: {{vocab_size: 400}}}}
train: {{seq_len: 64, batch_size: 8, lr: 5.0e-3, max_steps: 20, seed: 1}}
index:
  documents: [{{path: docs}}]
serve: {{max_tokens: 32, max_body_bytes: 4096, top_k: 1, models: [tuned, base]}}
""")
    build = api.load(work / "r.yaml", cache_dir=work / "cache")
    assert api.apply(build).ok
    app, _ = api.serve_app([build], token=TOKEN)
    SERVED["recipe"] = work / "r.yaml"
    SERVED["cache"] = work / "cache"
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
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
    return {"model": "tiny-tuned", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, **extra}


def test_models_lists_the_tuned_model_and_document_chat(server: str) -> None:
    r = httpx.get(f"{server}/v1/models", headers=auth())
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny-tuned", "tiny-base", "tiny-tuned+docs", "tiny-base+docs"]


def test_two_models_side_by_side(server: str) -> None:
    tuned = httpx.post(f"{server}/v1/chat/completions", json=chat_body(), headers=auth(), timeout=60).json()
    base = httpx.post(f"{server}/v1/chat/completions", json=chat_body(model="tiny-base"), headers=auth(), timeout=60).json()
    assert tuned["model"] == "tiny-tuned" and base["model"] == "tiny-base"
    assert all(isinstance(r["choices"][0]["message"]["content"], str) for r in (tuned, base))


def test_chat_streaming_matches_non_streaming(server: str) -> None:
    whole = httpx.post(f"{server}/v1/chat/completions", json=chat_body(), headers=auth(), timeout=60).json()
    text = whole["choices"][0]["message"]["content"]
    assert whole["usage"]["completion_tokens"] > 0 and whole["object"] == "chat.completion"
    pieces = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=chat_body(stream=True), headers=auth(),
                      timeout=60) as r:
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
    reply = client.chat.completions.create(model="tiny-tuned", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8)
    assert isinstance(reply.choices[0].message.content, str)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-tuned", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True))
    assert streamed.strip() == reply.choices[0].message.content.strip()
    done = client.completions.create(model="tiny-tuned", prompt="<human>: Hello\n<bot>: ", max_tokens=8)
    assert isinstance(done.choices[0].text, str)
    emb = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a river", "some bread"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384


def test_document_chat_returns_its_sources(server: str) -> None:
    body = {"model": "tiny-tuned+docs", "messages": [{"role": "user", "content": "Which river is longest in Africa?"}],
            "max_tokens": 8}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=auth(), timeout=60).json()
    assert r["sources"][0]["document"] == "docs/rivers.md" and "Nile" in r["sources"][0]["text"]


def test_bad_requests_get_json_errors(server: str) -> None:
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={**auth(), "content-type": "application/json"})
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
  sources: [{{name: s, format: oasst, path: {ROOT / 'recipes/data/sample.oasst.jsonl'}}}]
model:
  base: {{from_config: {{architecture: llama, hidden_size: 64, layers: 1, heads: 4}}}}
  tokenizer: {{train: {{vocab_size: 300}}}}
""")
    with pytest.raises(RunnerError, match="is not built"):
        api.serve_app([api.load(tmp_path / "r.yaml")])


def test_terminal_chat_carries_the_conversation(server: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "runner", "chat", str(SERVED["recipe"]), "--docs", "--max-tokens", "6"],
                          input="Which river is longest?\nAnd the second?\n/reset\n/quit\n", capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "RUNNER_CACHE": str(SERVED["cache"])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot>") == 2 and "docs/rivers.md" in proc.stdout


def test_a_conversation_becomes_one_prompt_with_its_history() -> None:
    from runner.serving import Model

    m = Model("m", "human_bot", None, None)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Capital of France?"}]
    assert m.prompt(history) == "<human>: Hi\n<bot>: Hello!\n<human>: Capital of France?\n<bot>:"
