"""The chat page at `/`, in a real browser: Debian's Chromium driven by Playwright, against `runner serve` on loopback.

Screenshots go to $RUNNER_SCREENSHOTS when it is set (docs/img is refreshed so), else to the test's tmp dir."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runner import api
from tests.conftest import shots, tiny_model_recipe
from tests.test_serving import start

pytest.importorskip("gradio", reason="the chat page needs the ui extra")
TOKEN = "ui-s3cret"
HTML = "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("ui")
    (work / "docs").mkdir()
    (work / "docs" / "rivers.md").write_text(
        "The Nile is the longest river in Africa and flows into the Mediterranean Sea."
    )
    (work / "docs" / "trap.md").write_text(f"A page about bread. {HTML}")
    (work / "r.yaml").write_text(
        tiny_model_recipe(
            head="name: tiny\n",
            rest="train: {seq_len: 64, batch_size: 8, lr: 5.0e-3, max_steps: 20, seed: 1}\n"
            "index:\n  documents: [{path: docs}]\n"
            "serve: {max_tokens: 48, top_k: 2, models: [tuned, base]}\n",
        )
    )
    build = api.load(work / "r.yaml", cache_dir=work / "cache")
    assert api.apply(build).ok
    return build


@pytest.fixture(scope="module")
def server(built: Any) -> Iterator[str]:
    app, _ = api.serve_app([built], token=TOKEN)
    url, srv = start(app)
    yield url
    srv.should_exit = True


@pytest.fixture(scope="module")
def forced(built: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """The same models behind a one-at-a-time server (batch_size 1: generate()'s own loop) where the base model
    never stops before max_tokens (as a chatty model does), and the tuned one says exactly HTML (transformers'
    constrained decoding picks its tokens)."""
    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.load import load_models

    models = load_models(built, ["tuned", "base"])
    base, tuned = models["tiny-base"], models["tiny-tuned"]
    chatty = base.generate_kwargs
    base.generate_kwargs = lambda s, cancel, n: {**chatty(s, cancel, n), "min_new_tokens": s.max_tokens}  # type: ignore[method-assign]
    html_ids = tuned.codec.tokenizer(HTML, add_special_tokens=False)["input_ids"]
    eos = tuned.codec.tokenizer.eos_token_id

    def says_html(s: Any, cancel: Any, n: int) -> dict[str, Any]:
        def allowed(_batch: int, ids: Any) -> list[int]:
            done = len(ids) - n
            return [html_ids[done]] if done < len(html_ids) else [eos]

        return {**plain(s, cancel, n), "prefix_allowed_tokens_fn": allowed}

    plain = tuned.generate_kwargs
    tuned.generate_kwargs = says_html  # type: ignore[method-assign]
    url, srv = start(create_app(models, ServeConfig(max_tokens=1500, batch_size=1)))
    yield url, models
    srv.should_exit = True


class Tab:
    """A browser page on one server that records every request it makes and every dialog it opens."""

    def __init__(self, browser: Any, url: str) -> None:
        self.url, self.requests, self.dialogs, self.errors = url, [], [], []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        # the page is offline but for its own origin: any other request is refused and recorded
        self.page.route(re.compile(r"^(?!" + re.escape(url) + ").*"), lambda route: route.abort())
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.goto(url + "/")

    def sign_in(self, token: str = TOKEN) -> None:
        self.page.locator("input[type=password]").wait_for()
        self.page.locator("input[type=text]").first.fill("me")
        self.page.locator("input[type=password]").fill(token)
        self.page.get_by_role("button", name="Login").click()

    def pick(self, which: str, model: str) -> None:
        self.page.locator(f"#{which} input").click()
        self.page.locator(f"#{which}").get_by_role("option", name=model, exact=True).click()

    def max_tokens(self, n: int) -> None:
        """Set in the settings (opened first); the page has it before the next message is sent."""
        number = self.page.locator("input[type=number][aria-label='number input for Max tokens']")
        slider = self.page.locator("input[type=range][aria-label='range slider for Max tokens']")
        deadline = time.time() + 10
        while slider.input_value() != str(n) and time.time() < deadline:  # the accordion may still be opening
            number.fill(str(n))
            number.press("Tab")
            time.sleep(0.2)
        assert slider.input_value() == str(n)
        time.sleep(0.3)

    def say(self, box: str, text: str) -> None:
        self.page.locator(f"#{box} textarea").fill(text)
        self.page.locator(f"#{box} textarea").press("Enter")

    def bot(self, chat: str) -> Any:
        """The chat's answers (their sources left out)."""
        return self.page.locator(f"#{chat} .bot .message:not(.thought)")

    def wait_answer(self, chat: str, index: int = -1, timeout: float = 60) -> str:
        """The text of a bot message once it stops changing (the answer is whole)."""
        deadline, last, same = time.time() + timeout, None, 0
        while time.time() < deadline:
            bots = self.bot(chat)
            text = bots.nth(index).inner_text() if bots.count() else None
            same = same + 1 if text and text == last else 0
            if same >= 4:
                return str(text)
            last = text
            time.sleep(0.25)
        raise AssertionError(f"no whole answer in #{chat} within {timeout} s (last: {last!r})")


def served_answer(url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> str:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"model": model, "messages": messages, "max_tokens": max_tokens},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def test_the_page_signs_in_with_the_token_and_stays_on_its_origin(server: str, browser: Any) -> None:
    tab = Tab(browser, server)
    tab.sign_in("wrong")
    tab.page.get_by_text("Incorrect Credentials").wait_for()
    tab.sign_in()
    tab.pick("chat-model", "tiny-base")
    tab.say("chat-box", "Which river is longest?")
    tab.wait_answer("chat")
    assert all(r.startswith(server + "/") for r in tab.requests), "a request left the page's origin"
    assert not any(TOKEN in r for r in tab.requests), "the token went into a URL"
    cookies = tab.context.cookies()
    assert cookies and all(c["domain"] == "127.0.0.1" and c["httpOnly"] for c in cookies)
    assert not any(TOKEN in c["value"] for c in cookies)
    assert not [e for e in tab.errors if "Content Security Policy" in e], tab.errors


def test_the_page_and_its_api_refuse_strangers(server: str) -> None:
    r = httpx.get(server + "/")
    policy = r.headers["content-security-policy"]
    assert r.status_code == 200 and "script-src 'self' 'nonce-" in policy and "frame-ancestors 'none'" in policy
    nonce = re.search(r"'nonce-([^']+)'", policy)
    assert nonce and r.text.count("<script") == r.text.count(f'<script nonce="{nonce.group(1)}"')
    assert httpx.get(server + "/").headers["content-security-policy"] != policy, "a nonce is used once"
    config = httpx.get(server + "/config")
    assert config.status_code == 401, "the page's config (its components, their values) needs the sign-in"
    assert httpx.post(server + "/gradio_api/queue/join", json={"fn_index": 0, "data": []}).status_code == 401
    assert httpx.get(server + "/v1/models").status_code == 401, "the API still needs the bearer token"
    r = httpx.get(server + "/v1/nowhere", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", "the API's 404 stays JSON"
    r = httpx.get(server + "/v1/chat/completions", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 405


def test_answers_stream_and_stop_frees_the_model(forced: tuple[str, dict[str, Any]], browser: Any) -> None:
    url, models = forced
    tab = Tab(browser, url)
    tab.page.locator("#chat-box textarea").wait_for()  # no token: no sign-in
    tab.page.get_by_text("Settings").click()
    tab.max_tokens(1500)
    tab.pick("chat-model", "tiny-base")
    tab.say("chat-box", "Tell me everything.")
    lengths: list[int] = []
    deadline = time.time() + 60
    while len(set(lengths)) < 3 and time.time() < deadline:  # the answer grows as tokens come
        if tab.bot("chat").count():
            lengths.append(len(tab.bot("chat").last.inner_text()))
        time.sleep(0.1)
    assert len({n for n in lengths if n}) >= 2 and models["tiny-base"].lock.locked(), lengths
    tab.page.locator("#chat-stop").click()
    deadline = time.time() + 5
    while models["tiny-base"].lock.locked() and time.time() < deadline:
        time.sleep(0.02)
    assert not models["tiny-base"].lock.locked(), "Stop did not free the model"
    time.sleep(1)  # updates already on their way land
    stopped = tab.bot("chat").last.inner_text()
    time.sleep(1)
    assert tab.bot("chat").last.inner_text() == stopped and 0 < len(stopped) < 1500 * 2
    started = time.perf_counter()  # the next request is served at once
    tab.max_tokens(5)
    tab.say("chat-box", "And briefly?")
    tab.wait_answer("chat")
    assert tab.bot("chat").count() == 2 and time.perf_counter() - started < 10


@pytest.fixture(scope="module")
def batched(built: Any) -> Iterator[str]:
    """The base model behind the continuous batcher, allowed long answers (it never stops before max_tokens)."""
    from runner.schema import ServeConfig
    from runner.serve.app import create_app
    from runner.serve.load import load_models

    url, srv = start(create_app(load_models(built, ["base"]), ServeConfig(max_tokens=1500, batch_size=4)))
    yield url
    srv.should_exit = True


def test_two_visitors_are_answered_at_once(batched: str, browser: Any) -> None:
    """A second visitor's answer does not wait for the first's (Gradio's default runs an event for one visitor
    at a time): it starts while the first is still streaming, and the batcher serves both."""
    tabs = [Tab(browser, batched), Tab(browser, batched)]
    for tab in tabs:
        tab.page.locator("#chat-box textarea").wait_for()
        tab.page.get_by_text("Settings").click()
        tab.max_tokens(1500)
    tabs[0].say("chat-box", "Tell me everything.")
    tabs[0].bot("chat").first.wait_for()
    tabs[1].say("chat-box", "And you, tell me everything.")
    deadline = time.time() + 30
    while time.time() < deadline and not (tabs[1].bot("chat").count() and tabs[1].bot("chat").last.inner_text()):
        time.sleep(0.05)
    assert tabs[1].bot("chat").last.inner_text(), "the second answer never started"
    assert len(tabs[0].bot("chat").last.inner_text()) < 1500 * 2, "the first answer had already ended"
    for tab in tabs:
        tab.page.locator("#chat-stop").click()


def test_model_output_and_documents_are_shown_as_text(forced: tuple[str, dict[str, Any]], browser: Any) -> None:
    url, _ = forced
    tab = Tab(browser, url)
    tab.page.locator("#chat-box textarea").wait_for()
    tab.pick("chat-model", "tiny-tuned")
    tab.say("chat-box", "<b>Say</b> something")
    answer = tab.wait_answer("chat")
    assert HTML in answer, "the model's HTML is shown as its characters"
    assert "<b>Say</b> something" in tab.page.locator("#chat .user").first.inner_text()
    for tag in ("img", "script", "b"):
        assert tab.page.locator(f"#chat .message-wrap {tag}").count() == 0, f"a <{tag}> was rendered"
    assert tab.page.title() != "pwned" and not tab.dialogs


def test_retry_edit_and_undo(server: str, browser: Any) -> None:
    tab = Tab(browser, server)
    tab.sign_in()
    tab.pick("chat-model", "tiny-base")
    tab.say("chat-box", "Which river is longest?")
    first = tab.wait_answer("chat")
    tab.page.locator("#chat button[aria-label='Retry']").click()
    assert tab.wait_answer("chat") == first and tab.bot("chat").count() == 1, "greedy: the same answer again"
    tab.page.locator("#chat .user").hover()
    tab.page.locator("#chat button[aria-label='Edit']").click()
    tab.page.locator("#chat textarea").fill("Name a river, <i>please</i>")
    tab.page.locator("#chat button[aria-label='Submit']").click()
    answer = tab.wait_answer("chat")
    question = [{"role": "user", "content": "Name a river, <i>please</i>"}]
    assert tab.page.locator("#chat .user").inner_text() == "Name a river, <i>please</i>"
    assert answer == served_answer(server, "tiny-base", question, 48).strip() and tab.bot("chat").count() == 1
    tab.page.locator("#chat button[aria-label='Undo']").click()
    tab.page.locator("#chat .user").wait_for(state="detached")
    assert tab.page.locator("#chat-box textarea").input_value() == "Name a river, <i>please</i>"


def test_a_document_answer_shows_its_sources(server: str, browser: Any, tmp_path: Path) -> None:
    tab = Tab(browser, server)
    tab.sign_in()
    tab.pick("chat-model", "tiny-base+docs")
    tab.say("chat-box", "Tell me about bread")
    tab.wait_answer("chat", index=0)
    titles = tab.page.locator("#chat .thought-group [role=button]", has_text="docs/")
    titles.first.wait_for()
    shown = [titles.nth(i).inner_text() for i in range(titles.count())]
    assert any("docs/trap.md" in t for t in shown) and any("docs/rivers.md" in t for t in shown), shown
    trap = titles.filter(has_text="docs/trap.md")
    assert not tab.page.get_by_text("A page about bread").is_visible(), "a source starts closed"
    trap.click()  # open the chunk
    chunk = tab.page.get_by_text("A page about bread")
    chunk.wait_for()
    assert HTML in chunk.inner_text() and tab.page.title() != "pwned" and not tab.dialogs
    time.sleep(0.5)  # the chunk's box has opened
    tab.page.screenshot(path=str(shots(tmp_path) / "chat.png"))


def test_two_models_answer_side_by_side(forced: tuple[str, dict[str, Any]], browser: Any, tmp_path: Path) -> None:
    url, _ = forced
    tab = Tab(browser, url)
    tab.page.get_by_role("tab", name="Compare").click()
    tab.page.get_by_text("Settings").click()
    tab.max_tokens(128)
    tab.pick("compare-model-a", "tiny-tuned")
    tab.pick("compare-model-b", "tiny-base")
    tab.say("compare-box", "Which river is longest?")
    a, b = tab.wait_answer("compare-a"), tab.wait_answer("compare-b")
    question = [{"role": "user", "content": "Which river is longest?"}]
    assert a == served_answer(url, "tiny-tuned", question, 128) == HTML
    assert b == served_answer(url, "tiny-base", question, 128).strip() and a != b
    tab.page.screenshot(path=str(shots(tmp_path) / "compare.png"))


def test_no_ui_extra_no_gradio_import(built: Any) -> None:
    """Without the page (serve.ui false, or the extra not installed) the API starts without importing Gradio."""
    code = (
        "import sys; from runner import api; from runner.serve.app import create_app; "
        "from runner.schema import ServeConfig; create_app({}, ServeConfig(ui=False)); "
        "create_app({}, ServeConfig()); print('gradio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
