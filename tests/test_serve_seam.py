"""The engine seam without a server: an OpenAI request becomes `Sampling`, and a parameter an engine does not
honour is refused by name, in one place, for every engine (runner/serve/openai.py and engine.py import no web
framework and no ML library)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from runner.serve.engine import OPTIONAL, NotSupported, Sampling, check_supported
from runner.serve.hf import TransformersEngine
from runner.serve.llamacpp import LlamaCppEngine
from runner.serve.load import SUPPORTS
from runner.serve.openai import ApiError, ChatRequest, CompletionRequest

# each optional parameter set away from its neutral value, as a request would
ASKED: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "seed": 3,
    "stop": "\n",
    "logprobs": True,
    "min_tokens": 2,
    "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
    "logit_bias": {"17": -100},
    "echo": True,  # completions only
}


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def asking(name: str, value: Any) -> Sampling:
    """The sampling of a request that sets one optional parameter (on the endpoint that takes it)."""
    if name == "echo":
        return CompletionRequest.model_validate({"model": "m", "prompt": "hi", name: value}).sampling(limit=64)
    return chat(**{name: value}).sampling(limit=64)


def test_every_optional_parameter_reaches_sampling() -> None:
    assert set(ASKED) == set(OPTIONAL)
    for name, value in ASKED.items():
        assert asking(name, value).asked() == [name], name
    s = chat(**{k: v for k, v in ASKED.items() if k != "echo"}, top_logprobs=3).sampling(limit=64)
    assert (s.stop, s.logprobs, s.logit_bias) == (("\n",), 3, ((17, -100.0),))
    assert s.max_tokens == 64 and s.min_tokens == 2 and s.seed == 3
    c = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 2, "stop": ["a", "b"]})
    assert (c.sampling(limit=16).logprobs, c.sampling(limit=16).stop) == (2, ("a", "b"))


class Declared:
    """An engine as far as the seam looks at it: its name and what it honours."""

    def __init__(self, kind: str, supports: frozenset[str]) -> None:
        self.kind, self.supports = kind, supports


@pytest.mark.parametrize("kind", sorted(SUPPORTS))
def test_each_engine_refuses_by_name_what_it_does_not_honour(kind: str) -> None:
    engine: Any = Declared(kind, SUPPORTS[kind])
    for name, value in ASKED.items():
        s = asking(name, value)
        if name in SUPPORTS[kind]:
            check_supported(engine, s)
        else:
            with pytest.raises(NotSupported) as err:
                check_supported(engine, s)
            assert err.value.param == name and f"{name} is not supported by serve.engine {kind}" == str(err.value)
    check_supported(engine, Sampling(max_tokens=8))  # a plain request: every engine


def test_the_engines_declare_what_they_implement() -> None:
    assert SUPPORTS["transformers"] == TransformersEngine.supports and "logprobs" in TransformersEngine.supports
    assert SUPPORTS["llama_cpp"] == LlamaCppEngine.supports and "logprobs" not in LlamaCppEngine.supports
    assert SUPPORTS["vllm"] == frozenset(OPTIONAL)
    assert TransformersEngine.kind == "transformers" and LlamaCppEngine.kind == "llama_cpp"


def test_what_no_engine_can_do_here_is_refused_by_the_request() -> None:
    for fields, param in (
        ({"stream": True, "n": 2}, "n"),
        ({"stream": True, "logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}], "stream": True}, "tools"),  # tools: whole answers (the calls are parsed)
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"min_tokens": 70, "max_tokens": 64}, "min_tokens"),
        ({"logit_bias": {"a token": 1}}, "logit_bias"),
    ):
        with pytest.raises(ApiError) as err:
            chat(**fields).sampling(limit=64)
        assert (err.value.status, err.value.param) == (400, param), fields
    prompts = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b", "c"], "n": 3})
    with pytest.raises(ApiError, match="at most 8 completions"):
        prompts.sampling(limit=64)
    one = CompletionRequest.model_validate({"model": "m", "prompt": list(range(20)), "n": 8})  # token ids: one prompt
    assert one.sampling(limit=64).max_tokens == 64
    for fields, param in (
        ({"max_tokens": 0}, "max_tokens"),  # an answer of nothing, and no prompt echoed
        ({"echo": True, "stream": True}, "echo"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [[1, 2]] * 5, "n": 2}, "prompt"),
        ({"best_of": 2}, "best_of"),
    ):
        with pytest.raises(ApiError) as err:
            CompletionRequest.model_validate({"model": "m", "prompt": "x", **fields}).sampling(limit=64)
        assert (err.value.status, err.value.param) == (400, param), fields


def test_completions_take_every_prompt_shape_of_the_openai_api() -> None:
    def prompts(prompt: Any) -> list[Any]:
        return CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompts()

    assert prompts("a") == ["a"] and prompts(["a", "b"]) == ["a", "b"] and prompts([]) == [""]
    assert prompts([5, 6]) == [[5, 6]] and prompts([[5, 6], [7]]) == [[5, 6], [7]]
    echoed = CompletionRequest.model_validate({"model": "m", "prompt": [[5]], "echo": True, "max_tokens": 0})
    assert echoed.sampling(limit=64).max_tokens == 0 and echoed.sampling(limit=64).echo


def test_an_engine_refuses_before_it_generates() -> None:
    """Called from Python (`api.model`), not only through the server, an engine refuses what it cannot do before
    touching the model."""
    from runner.serve.codec import Codec

    engine = LlamaCppEngine("m", Codec("plain", None), llm=None, precision="gguf q8_0")
    with pytest.raises(NotSupported, match=r"logprobs is not supported by serve\.engine llama_cpp"):
        engine.generate_all([("hi", Sampling(max_tokens=4, logprobs=0))])
    with pytest.raises(NotSupported, match="frequency_penalty"):
        engine.start([1, 2], Sampling(max_tokens=4, frequency_penalty=0.5), threading.Event(), print)
