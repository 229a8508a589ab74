"""The browser playground at `/` (serve/static/), in a real headless browser: Debian's chromium driven by selenium
through chromedriver (CI installs both: `apt-get install chromium chromium-driver`). The page loads, a wrong token
shows a clear message, a chat streams into both columns (the user's adapter and the bare base) and equals the API's
own replies (same seed), a pasted text gets each side's ppl (and per-token surprise when /v1/completions has echo
logprobs, else the page says why not), and the admin token shows users, adapter methods and the cache. Screenshots
go to $SHAREDLLM_TEST_ARTIFACTS (default tests/artifacts/, git-ignored). Also, without a browser: the static
files' content types and headers, and the read-only `GET /v1/users` the admin view uses."""
from __future__ import annotations

import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from sharedllm.serve import build
from sharedllm.store import ADMIN_ENV

from .serve_kit import ADMIN, LiveServer, adapter_bytes

ARTIFACTS = Path(os.environ.get("SHAREDLLM_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
WAIT_S = 180  # generous: the test never measures speed, and CI shares two cores
CHAT = "tell me about the cat on the mat"
TEXT = "the quick brown cat sat on the mat, and then the dog ran away from the cat."


def auth(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    mp = pytest.MonkeyPatch()
    mp.setenv(ADMIN_ENV, ADMIN)
    app, router, _ = build(tiny, tmp / "store")
    with LiveServer(app) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        toks = {u: c.post("/v1/users", json={"user": u}, headers=auth(ADMIN)).json()["token"] for u in ("ann", "cy")}
        up = c.put("/v1/users/ann/adapter", content=adapter_bytes(tiny, 7, tmp, scale=0.6), headers=auth(toks["ann"]))
        assert up.status_code == 200, up.text
        yield srv, c, toks, router
    router.close()
    router.store.close()
    mp.undo()


def test_static_files_have_their_content_types_and_a_strict_policy(live):
    _, c, _, _ = live
    for path, media in (("/", "text/html"), ("/static/playground.js", "text/javascript"),
                        ("/static/playground.css", "text/css")):
        r = c.get(path)
        assert r.status_code == 200 and r.headers["content-type"] == f"{media}; charset=utf-8", path
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "script-src 'self'" in r.headers["content-security-policy"]
    page = c.get("/").text
    assert "/static/playground.js" in page and "http" not in page.replace("http-equiv", "")  # nothing from elsewhere
    js = c.get("/static/playground.js").text
    assert "innerHTML" not in js.replace("never innerHTML", "") and "insertAdjacentHTML" not in js
    assert c.get("/static/nothing.js").status_code == 404 and c.get("/static/../app.py").status_code == 404


def test_users_route_lists_users_adapters_and_cache_state_read_only(live):
    _, c, toks, router = live
    assert c.get("/v1/users").status_code == 401
    assert c.get("/v1/users", headers=auth("sk-wrong")).status_code == 401
    mine = c.get("/v1/users", headers=auth(toks["cy"])).json()
    assert mine == {"users": [{"user": "cy", "created": mine["users"][0]["created"], "adapter": None}], "total": 1,
                    "admin": False}  # a user token sees its own row only
    rec = router.store.get("ann")
    everyone = c.get("/v1/users", headers=auth(ADMIN)).json()
    assert everyone["admin"] is True and everyone["total"] == 2
    assert [u["user"] for u in everyone["users"]] == ["ann", "cy"]
    ann = everyone["users"][0]["adapter"]
    assert ann == {"method": "norm", "scheme": rec.meta["scheme"], "params": rec.meta["params"], "bytes": rec.bytes,
                   "sha256": rec.sha256, "updated": rec.updated, "cached": rec.sha256 in router.cache}
    first = c.get("/v1/users?limit=1", headers=auth(ADMIN)).json()
    assert [u["user"] for u in first["users"]] == ["ann"] and first["total"] == 2
    for bad in ("0", "10001", "x", "1.5", "-1", "٣"):
        assert c.get(f"/v1/users?limit={bad}", headers=auth(ADMIN)).status_code == 422, bad
    assert c.get("/v1/users?limit=x").status_code == 401  # the token before the query
    old = router.cache
    try:
        router.cache = type(old)(old.capacity)  # a fresh process's cache: the adapter is loaded on first use
        assert c.get("/v1/users", headers=auth(ADMIN)).json()["users"][0]["adapter"]["cached"] is False
        assert c.post("/v1/score", json={"text": "the cat"}, headers=auth(toks["ann"])).status_code == 200
        assert c.get("/v1/users", headers=auth(ADMIN)).json()["users"][0]["adapter"]["cached"] is True
    finally:
        router.cache = old
    assert router.store.users(10)[1] == 2  # nothing was created or changed


# ---- the browser -------------------------------------------------------------------------------------------
def chromium():
    """Headless Debian chromium through chromedriver; a clear failure (never a skip) when either is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)
    binary = os.environ.get("SHAREDLLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("SHAREDLLM_CHROMEDRIVER") or shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail(f"the playground test needs chromium and chromedriver (found {binary!r}, {driver!r}): "
                    "apt-get install -y chromium chromium-driver (or set SHAREDLLM_CHROMIUM / "
                    "SHAREDLLM_CHROMEDRIVER)", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--window-size=1280,1500", "--lang=en-US"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


@pytest.fixture(scope="module")
def browser():
    d = chromium()
    d.set_script_timeout(60)
    yield d
    d.quit()


def wait(d, check, what: str, *args):
    """Until `check` is truthy (a JS function body such as "return ...", run in the page with `args`, or a Python
    callable of the driver); its value."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    probe = check if callable(check) else (lambda d: d.execute_script(check, *args))
    try:
        return WebDriverWait(d, WAIT_S, poll_frequency=0.1).until(probe)
    except TimeoutException:
        status = d.execute_script("return document.getElementById('token-status').textContent")
        raise AssertionError(f"the page never showed {what} in {WAIT_S} s (token status: {status!r})") from None


def fill(d, element_id: str, text: str) -> None:
    el = d.find_element("id", element_id)
    el.clear()
    el.send_keys(text)


def use_token(d, token: str) -> str:
    d.execute_script("document.getElementById('token-status').textContent = ''")
    fill(d, "token", token)
    d.find_element("id", "token-use").click()
    return wait(d, "const s = document.getElementById('token-status');"
                   "return s.dataset.kind && s.textContent", "a token verdict")


def shot(d, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1280, max(900, min(int(height) + 40, 4000)))
    path = ARTIFACTS / name
    assert d.save_screenshot(str(path)), path
    assert path.stat().st_size > 10_000
    return path


BUBBLES = """return Array.from(document.querySelectorAll('#log-' + arguments[0] + ' .msg.assistant')).map(
    b => ({state: b.dataset.state, chunks: Number(b.dataset.chunks), text: b.querySelector('.text').textContent,
           err: (b.querySelector('.err') || {}).textContent || null,
           info: (b.querySelector('.info') || {}).textContent || null}));"""


def finished_reply(d, side: str):
    """The first assistant bubble of `side` ("user" or "none") once its stream has ended, else None."""
    bubbles = d.execute_script(BUBBLES, side)
    return bubbles[0] if bubbles and bubbles[0]["state"] != "streaming" else None


def test_the_page_loads_refuses_a_wrong_token_and_streams_a_chat_beside_the_base(live, browser):
    srv, c, toks, _ = live
    d = browser
    d.get(srv.url + "/")
    assert d.title == "sharedllm playground"
    wait(d, "return document.getElementById('server').textContent.includes('base tiny')", "the server's /health")

    verdict = use_token(d, "sk-not-a-token")
    assert verdict.startswith("Wrong token: the server does not accept it (401)"), verdict
    assert d.execute_script("return document.getElementById('token-status').dataset.kind") == "error"
    verdict = use_token(d, toks["ann"])
    assert verdict.startswith("Signed in as ann · norm adapter"), verdict

    fill(d, "max-tokens", "24")
    fill(d, "temperature", "1")
    fill(d, "seed", "3")
    fill(d, "chat-input", CHAT)
    d.find_element("id", "chat-send").click()
    replies = {side: wait(d, lambda d, side=side: finished_reply(d, side), f"the end of the {side} stream")
               for side in ("user", "none")}
    with ThreadPoolExecutor(2) as pool:  # both at once: they share the engine's batches, as the page's did
        wants = dict(zip(replies, pool.map(lambda side: c.post("/v1/chat/completions", headers=auth(toks["ann"]), json={
            "messages": [{"role": "user", "content": CHAT}], "max_tokens": 24, "temperature": 1, "seed": 3,
            "adapter": side}).json()["choices"][0]["message"]["content"], replies)))
    for side, got in replies.items():
        want = wants[side]
        assert got["state"] == "done" and got["err"] is None, got
        assert got["text"] == want, side  # the page's streamed text is the API's own reply
        assert len(want) >= 8 and got["chunks"] >= 2, got  # it arrived as several streamed pieces
    assert replies["user"]["text"] != replies["none"]["text"]  # the adapter changes what the model says

    fill(d, "score-input", TEXT)
    d.find_element("id", "score-go").click()
    ppl = {side: float(wait(d, "return document.getElementById('ppl-' + arguments[0]).dataset.ppl",
                            f"the {side} ppl", side)) for side in ("user", "none")}
    wait(d, "return !document.getElementById('score-go').disabled", "the end of scoring")
    for side in ("user", "none"):
        want = c.post("/v1/score", json={"text": TEXT, "adapter": side}, headers=auth(toks["ann"])).json()
        assert math.isclose(ppl[side], want["ppl"], rel_tol=1e-9), side
    echo = c.post("/v1/completions", headers=auth(toks["ann"]),
                  json={"prompt": TEXT, "echo": True, "max_tokens": 0, "logprobs": 1})
    lp = echo.json()["choices"][0].get("logprobs") if echo.status_code == 200 else None
    note = d.execute_script("const n = document.getElementById('score-note'); return n.hidden ? null : n.textContent")
    if lp and lp.get("token_logprobs"):  # the server has echo logprobs: the page colours every token by them
        shown = d.execute_script("return Array.from(document.querySelectorAll('#tokens-user .tok')).map(s => "
                                 "[s.textContent, s.dataset.value === undefined ? null : Number(s.dataset.value)])")
        assert len(shown) == len(lp["tokens"]) and note is None
        for (tok, value), want_tok, want_lp in zip(shown, lp["tokens"], lp["token_logprobs"]):
            assert tok == want_tok.replace("\n", "↵\n")
            assert (value is None) == (want_lp is None) and (want_lp is None or abs(value + want_lp) < 1e-3)
        assert d.execute_script("return !document.getElementById('diff-box').hidden")
    else:  # not (yet): the page says so and shows /v1/score's totals
        assert note and note.startswith("Per-token surprise needs logprobs with echo on /v1/completions"), note
    print("screenshot:", shot(d, "playground.png"))

    verdict = use_token(d, ADMIN)
    assert verdict.startswith("Admin token"), verdict
    rows = wait(d, "const r = Array.from(document.querySelectorAll('#users tbody tr')).map("
                   "tr => Array.from(tr.cells).map(td => td.textContent)); return r.length === 2 && r",
                "the users table")
    assert rows[0][:3] == ["ann", "norm", live[3].store.get("ann").meta["scheme"]] and rows[0][-1] == "yes", rows
    assert rows[1][:2] == ["cy", "no adapter"], rows
    assert d.execute_script("return document.getElementById('chat').hidden")  # admin: no model calls offered
    wait(d, "return document.getElementById('health').textContent.includes('cache capacity bytes')", "/health")
    print("screenshot:", shot(d, "playground-admin.png"))
