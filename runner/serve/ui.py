"""The chat page at `/` (the `ui` extra): Gradio's components on the API's port, over the same models.

Two tabs: Chat (pick a model, tuned, base or `+docs`; answers stream; Stop frees the model as a dropped stream does;
retry, undo and edit a message; the sources of a document answer, each opening its chunk) and Compare (two models
answer the same prompt side by side, as h2oGPT's compare does). The system prompt and sampling settings are shared.
Gradio's page and scripts ship in its package: nothing is fetched from another origin.

Safety: what the user typed, the model said and the documents hold is shown as text: its HTML is escaped before it
reaches the page, never rendered. With a token, the page asks for it once (Gradio's sign-in form: any user name,
the token as the password) and keeps a session cookie for its own origin; the token is never put in a URL. The
Guard sends every path outside the API here and adds the Content-Security-Policy."""

from __future__ import annotations

import asyncio
import html
import os
import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # else Gradio reports usage to its servers
import gradio as gr  # only `runner serve` with the `ui` extra imports this module
from starlette.concurrency import run_in_threadpool

from runner.serve.codec import BadTokens, ContextTooLong
from runner.serve.engine import NotSupported, Sampling, astream, check_supported

if TYPE_CHECKING:
    from runner.serve.app import Service

Message = dict[str, Any]  # a shown chat message: role, content (escaped text), and `metadata` on a source
Settings = tuple[str, float, float, float]  # system prompt, temperature, top_p, max_tokens


def mount(app: Any, service: Service, token: str | None) -> Any:
    """The page's ASGI app, for the Guard to send every path outside the API to (`app`'s start-up starts it)."""

    def signed_in(_user: str, password: str) -> bool:
        assert token is not None
        return secrets.compare_digest(password.encode(), token.encode())

    gr.mount_gradio_app(
        app,
        Page(service).blocks(),
        path="/",
        auth=signed_in if token else None,
        auth_message="Any user name; the password is the server's bearer token." if token else None,
        footer_links=[],
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,
        theme=gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]),
    )
    # mounted at / it would also answer the API's unknown paths and wrong methods: the Guard routes to it instead
    return app.routes.pop().app


class Page:
    """The page's handlers: each answer streams from the engine in this process."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.names = list(service.models) + list(service.doc_models)

    def blocks(self) -> Any:
        limit = self.service.config.max_tokens
        quiet: dict[str, Any] = {"api_visibility": "private", "queue": False}
        with gr.Blocks(title="runner") as blocks:
            with gr.Accordion("Settings", open=False):
                system = gr.Textbox(self.service.config.system or "", label="System prompt", lines=2)
                with gr.Row():
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                    max_tokens = gr.Slider(1, limit, value=min(128, limit), step=1, label="Max tokens")
            settings = [system, temperature, top_p, max_tokens]
            with gr.Tab("Chat"):
                model = gr.Dropdown(self.names, value=self.names[0], label="Model", elem_id="chat-model")
                chat = _chatbot("chat", "Chat", editable="user")
                with gr.Row():
                    box = gr.Textbox(elem_id="chat-box", placeholder="Ask the model", show_label=False, scale=6)
                    send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
                    stop = gr.Button("Stop", variant="stop", elem_id="chat-stop", scale=1)
                answer: dict[str, Any] = {
                    "fn": self.reply,
                    "inputs": [chat, model, *settings],
                    "outputs": chat,
                    "api_visibility": "private",
                    "concurrency_limit": None,  # every visitor at once: the engine batches their answers
                }
                replies = [
                    ev(self.ask, [box, chat], [box, chat], **quiet).then(**answer) for ev in (box.submit, send.click)
                ]
                replies.append(chat.retry(_retry, chat, chat, **quiet).then(**answer))
                replies.append(chat.edit(_edit, chat, chat, **quiet).then(**answer))
                chat.undo(_undo, chat, [chat, box], **quiet)
                stop.click(None, None, None, cancels=replies)
            with gr.Tab("Compare"):
                with gr.Row():
                    left = gr.Dropdown(self.names, value=self.names[0], label="Model A", elem_id="compare-model-a")
                    right = gr.Dropdown(
                        self.names, value=self.names[min(1, len(self.names) - 1)], label="Model B",
                        elem_id="compare-model-b",
                    )  # fmt: skip
                with gr.Row():
                    chat_a = _chatbot("compare-a", "A")
                    chat_b = _chatbot("compare-b", "B")
                with gr.Row():
                    prompt = gr.Textbox(elem_id="compare-box", placeholder="Ask both", show_label=False, scale=6)
                    both = gr.Button("Send", variant="primary", elem_id="compare-send", scale=1)
                    halt = gr.Button("Stop", variant="stop", elem_id="compare-stop", scale=1)
                pair: dict[str, Any] = {
                    "fn": self.compare,
                    "inputs": [chat_a, chat_b, left, right, *settings],
                    "outputs": [chat_a, chat_b],
                    "api_visibility": "private",
                    "concurrency_limit": None,
                }
                asked = [
                    ev(_ask_both, [prompt, chat_a, chat_b], [prompt, chat_a, chat_b], **quiet).then(**pair)
                    for ev in (prompt.submit, both.click)
                ]
                halt.click(None, None, None, cancels=asked)
        return blocks

    def ask(self, text: str, history: list[Message]) -> tuple[str, list[Message]]:
        """The typed message joins the conversation (the box empties); an empty one is not sent."""
        if not text.strip():
            raise gr.Error("type a message first", print_exception=False)
        return "", [*history, {"role": "user", "content": _shown(text)}]

    async def reply(self, history: list[Message], model: str, *settings: Any) -> AsyncIterator[list[Message]]:
        """The answer to the conversation's last user message, as it grows, then its sources."""
        if not history or history[-1]["role"] != "user":
            return
        async for messages in self.answer(model, history, _settings(settings)):
            yield [*history, *messages]

    async def compare(
        self, chat_a: list[Message], chat_b: list[Message], left: str, right: str, *settings: Any
    ) -> AsyncIterator[tuple[list[Message], list[Message]]]:
        """Both models' answers to the prompt each conversation ends with, streamed side by side."""
        if not chat_a or chat_a[-1]["role"] != "user":
            return
        shown, chats = [chat_a, chat_b], (chat_a, chat_b)
        updates: asyncio.Queue[tuple[int, list[Message]] | None] = asyncio.Queue()

        async def side(i: int, model: str) -> None:
            try:
                async for messages in self.answer(model, chats[i], _settings(settings)):
                    await updates.put((i, messages))
            finally:
                await updates.put(None)

        tasks = [asyncio.ensure_future(side(i, m)) for i, m in enumerate((left, right))]
        try:
            running = len(tasks)
            while running:
                update = await updates.get()
                if update is None:
                    running -= 1
                    continue
                i, messages = update
                shown[i] = [*chats[i], *messages]
                yield shown[0], shown[1]
            for t in tasks:
                t.result()  # an error on either side is shown
        finally:
            for t in tasks:  # stopped: both answers end, and both models are free
                t.cancel()

    async def answer(self, name: str, history: list[Message], settings: Settings) -> AsyncIterator[list[Message]]:
        """One model's answer to a conversation that ends with a user message, as shown messages: the answer as
        it grows, then (for `+docs`) one collapsed message per source with its chunk inside."""
        if name not in self.names:
            raise gr.Error(f"no model {name!r}", print_exception=False)
        model, docs = self.service.pick(name)
        system, temperature, top_p, max_tokens = settings
        s = Sampling(max_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p))
        try:
            check_supported(model, s)
        except NotSupported as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        messages = _conversation(history, system)
        sources: list[dict[str, Any]] = []
        if docs:
            turn, sources = await run_in_threadpool(self.service.docs_turn, messages[-1]["content"])
            messages[-1] = {"role": "user", "content": turn}
        try:
            ids = model.codec.encode(model.codec.prompt(messages), s.max_tokens)
        except (ContextTooLong, BadTokens) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        text = ""
        yield [{"role": "assistant", "content": ""}]
        async for piece in astream(model, ids, s):
            text += piece
            yield [{"role": "assistant", "content": _shown(text)}]
        yield [{"role": "assistant", "content": _shown(text)}, *map(_source, enumerate(sources, start=1))]


def _chatbot(elem_id: str, label: str, **kwargs: Any) -> Any:
    return gr.Chatbot(
        elem_id=elem_id,
        label=label,
        height=420,
        render_markdown=False,  # with escaped text: the characters as they are
        feedback_options=None,
        buttons=["copy"],
        **kwargs,
    )


def _ask_both(text: str, chat_a: list[Message], chat_b: list[Message]) -> tuple[str, list[Message], list[Message]]:
    if not text.strip():
        raise gr.Error("type a message first", print_exception=False)
    turn = {"role": "user", "content": _shown(text)}
    return "", [*chat_a, turn], [*chat_b, turn]


def _retry(history: list[Message]) -> list[Message]:
    """Back to the last user message, to be answered again."""
    end = max((i for i, m in enumerate(history) if m["role"] == "user"), default=-1)
    return history[: end + 1]


def _undo(history: list[Message]) -> tuple[list[Message], str]:
    """The last exchange taken back: its message returns to the box."""
    end = max((i for i, m in enumerate(history) if m["role"] == "user"), default=-1)
    if end < 0:
        return history, ""
    return history[:end], _plain(history[end]["content"])


def _edit(history: list[Message], edit: gr.EditData) -> list[Message]:
    """A user message changed in place: what came after it goes, and it is answered again."""
    index = edit.index if isinstance(edit.index, int) else edit.index[0]
    return [*history[:index], {"role": "user", "content": _shown(_plain(edit.value))}]


def _settings(values: tuple[Any, ...]) -> Settings:
    system, temperature, top_p, max_tokens = values
    return str(system or ""), float(temperature), float(top_p), float(max_tokens)


def _conversation(history: list[Message], system: str) -> list[dict[str, str]]:
    """The model's view of a shown conversation: the turns as typed and said (sources left out), after the
    system prompt."""
    turns = [{"role": "system", "content": system}] if system.strip() else []
    for m in history:
        if m.get("metadata") or m["role"] not in ("user", "assistant"):
            continue
        turns.append({"role": m["role"], "content": _plain(m["content"])})
    return turns


def _source(numbered: tuple[int, dict[str, Any]]) -> Message:
    """A source under a document answer: a collapsed message titled by its document, its chunk inside."""
    i, src = numbered
    title = f"[{i}] {src['title'] or src['document']} ({src['document']}, score {src['score']:.3f})"
    return {
        "role": "assistant",
        "content": _shown(src["text"]),
        "metadata": {"title": html.escape(title), "status": "done"},
    }


def _shown(text: str) -> str:
    """Text as the page shows it: its characters, HTML escaped (the chat renders what it is given as HTML)."""
    return html.escape(text, quote=False)


def _plain(content: Any) -> str:
    """A shown message's text, as typed or said (Gradio hands messages back as lists of parts)."""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return html.unescape(str(content))
