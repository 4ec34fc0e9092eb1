"""Model runtime for serving and terminal chat: a built recipe's model (base + LoRA adapter, or merged),
its tokenizer and prompt template; generation whole or streamed, one request at a time per model."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from runner.errors import RunnerError
from runner.params import Params
from runner.steps.prompts import render_prompt

Variant = Literal["tuned", "base", "merged"]


class ServeConfig(Params):
    """How `runner serve` and `runner chat` expose the recipe."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[Variant] = Field(default_factory=lambda: ["tuned"],
                                  description="tuned (base + adapter), base, merged; each is a model id NAME-VARIANT")
    docs: bool = Field(True, description="also serve NAME-VARIANT+docs: answers from the recipe's index, with sources")
    top_k: int = Field(4, ge=1, description="chunks retrieved for document chat")
    max_tokens: int = Field(256, ge=1, description="largest max_tokens a request may ask for")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    token_env: str | None = Field(None, description="if set, requests need `Authorization: Bearer $TOKEN_ENV`")
    system: str | None = Field(None, description="system prompt put before every conversation")


@dataclass
class Model:
    """A loaded model, used by one request at a time (others wait their turn)."""

    name: str
    template: str
    model: Any
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """A conversation (history carried across turns, as h2oGPT does) as the model's prompt text."""
        return render_prompt(self.template, messages, self.tokenizer)

    @property
    def stops(self) -> list[str]:
        return ["<human>:", "<bot>:"] if self.template == "human_bot" else []

    def _inputs(self, prompt: str) -> Any:
        return self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)

    def _kwargs(self, max_tokens: int, temperature: float) -> dict[str, Any]:
        sample = temperature > 0
        kw: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": sample,
                              "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        if sample:
            kw["temperature"] = temperature
        return kw

    def generate(self, prompt: str, *, max_tokens: int, temperature: float = 0.0) -> tuple[str, int, int, str]:
        """(text, prompt tokens, completion tokens, finish reason)."""
        import torch

        enc = self._inputs(prompt)
        with self.lock, torch.no_grad():
            out = self.model.generate(**enc, **self._kwargs(max_tokens, temperature))
        new = out[0, enc["input_ids"].shape[1]:]
        text, stopped = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), self.stops)
        finish = "stop" if stopped or len(new) < max_tokens else "length"
        return text, int(enc["input_ids"].shape[1]), int(len(new)), finish

    def stream(self, prompt: str, *, max_tokens: int, temperature: float = 0.0) -> Iterator[str]:
        """Text pieces as they are generated; stops at the template's stop strings."""
        import torch
        from transformers import TextIteratorStreamer

        enc = self._inputs(prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        with self.lock:
            def work() -> None:
                with torch.no_grad():
                    self.model.generate(**enc, **self._kwargs(max_tokens, temperature), streamer=streamer)

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            held = ""
            for piece in streamer:
                held += piece
                text, stopped = cut_at_stop(held, self.stops)
                if stopped:
                    if text:
                        yield text
                    for _ in streamer:  # let generation finish before the next request takes the model
                        pass
                    break
                safe = len(held) - _partial_stop(held, self.stops)
                if safe > 0:
                    yield held[:safe]
                    held = held[safe:]
            else:
                if held:
                    yield held
            thread.join()


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut].rstrip(), True) if cut >= 0 else (text, False)


def _partial_stop(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (held back while streaming)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best


def load_models(build: Any, variants: list[Variant]) -> dict[str, Model]:
    """The recipe's built model variants, by model id `RECIPE-VARIANT`."""
    from runner import api
    from runner.steps.quiet import quiet_ml

    quiet_ml()
    from peft import PeftModel
    from transformers import AutoTokenizer

    from runner.steps.models import base_dir, load_model

    r = build.loaded.recipe
    if r.model is None:
        raise RunnerError(f"{build.loaded.path} has no model: section to serve")
    needed = ["tokenizer", "train"] + (["merge"] if "merged" in variants else [])
    arts = {}
    have = api.built(build)
    for step in needed + (["model.init"] if "model.init" in build.graph.nodes else []):
        art = have.get(step)
        if art is None:
            what = "set train.merge: true and apply" if step == "merge" else f"run `runner apply {build.loaded.path}`"
            raise RunnerError(f"step {step} of {build.loaded.path} is not built: {what}")
        arts[step] = art
    tok = AutoTokenizer.from_pretrained(arts["tokenizer"].file("tokenizer"))
    tok.padding_side = "left"
    spec = r.model.model_copy(update={"revision": build.graph.nodes["train"].params.commit or r.model.revision})
    built = arts["model.init"].file("model") if "model.init" in arts else None
    precision = r.model.precision if r.model.precision in ("fp32", "bf16", "fp16") else "fp32"
    out = {}
    for variant in variants:
        if variant == "merged":
            model = load_model(arts["merge"].file("model"), precision)
        else:
            model = load_model(base_dir(spec, build.graph.nodes["train"].files, built), precision,
                               trust_remote_code=r.model.trust_remote_code)
            if variant == "tuned":
                model = PeftModel.from_pretrained(model, arts["train"].file("adapter"))
        model.eval()
        name = f"{build.loaded.name}-{variant}"
        out[name] = Model(name, r.data.prompt.template if r.data else "plain", model, tok)
    return out
