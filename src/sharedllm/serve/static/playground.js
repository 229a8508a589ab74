// The sharedllm playground: plain JS, no build step, no dependencies. It calls only the public API with the
// pasted token. Every piece of text from the user or the server goes into the page through textContent (el()
// and text nodes), never innerHTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SIDES = ["user", "none"]; // "adapter" field of the API: the user's own adapter, the bare base
  const state = { token: "", role: null, history: { user: [], none: [] }, controllers: [] };

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function setStatus(node, text, kind) {
    node.textContent = text;
    node.dataset.kind = kind || "";
  }

  function api(path, body, signal) {
    const headers = { Authorization: "Bearer " + state.token };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(path, {
      method: body === undefined ? "GET" : "POST", headers, signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  const WRONG_TOKEN = "Wrong token: the server does not accept it (401). Paste a user token as POST /v1/users " +
    "returned it (sk-…), or the admin token.";

  async function errorText(resp) {
    let detail = "";
    try {
      const j = await resp.json();
      detail = j.detail ?? (j.error && j.error.message) ?? "";
    } catch (e) { /* not JSON */ }
    if (Array.isArray(detail)) detail = detail.map((d) => (d.loc || []).join(".") + ": " + d.msg).join("; ");
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    if (resp.status === 401) return WRONG_TOKEN + (detail ? " (" + detail + ")" : "");
    if (resp.status === 429) return "Busy (429): " + (detail || "too many requests at once") + "; try again.";
    return "Error " + resp.status + (detail ? ": " + detail : "");
  }

  function fmtBytes(n) {
    if (typeof n !== "number") return "–";
    if (n < 1024) return n + " B";
    if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
    if (n < 1 << 30) return (n / (1 << 20)).toFixed(1) + " MiB";
    return (n / (1 << 30)).toFixed(2) + " GiB";
  }

  function fmtNum(x, digits) {
    if (x === null || x === undefined) return "–";
    return Number(x).toLocaleString("en-US", { maximumFractionDigits: digits ?? 2 });
  }

  function fmtTime(t) {
    return typeof t === "number" ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "–";
  }

  // ---- server and token ----------------------------------------------------------------------------------
  async function loadServer() {
    try {
      const r = await fetch("/health");
      const h = await r.json();
      setStatus($("server"), "base " + h.base + " · " + h.adapters + (h.adapters === 1 ? " adapter" : " adapters") +
        " stored · decode " + h.decode, "");
      return h;
    } catch (e) {
      setStatus($("server"), "The server does not answer /health: " + e.message, "error");
      return null;
    }
  }

  function showRole(role) {
    state.role = role;
    document.body.dataset.role = role || "";
    $("admin").hidden = role !== "admin";
    for (const s of document.querySelectorAll(".model")) s.hidden = role === "admin";
  }

  async function useToken(ev) {
    ev.preventDefault();
    const token = $("token").value.trim();
    const status = $("token-status");
    if (!token) { setStatus(status, "Paste a token first.", "error"); return; }
    state.token = token;
    setStatus(status, "Checking the token…", "");
    let r;
    try {
      r = await api("/v1/users");
    } catch (e) {
      setStatus(status, "No answer from the server: " + e.message, "error");
      return;
    }
    if (!r.ok) {
      state.token = "";
      showRole(null);
      setStatus(status, await errorText(r), "error");
      return;
    }
    const info = await r.json();
    if (info.admin) {
      showRole("admin");
      setStatus(status, "Admin token: you see the users, their adapters and the cache. Chat and scoring need a " +
        "user token.", "ok");
      renderUsers(info);
      loadHealth();
      return;
    }
    showRole("user");
    const me = info.users[0] || {};
    const a = me.adapter;
    const label = a ? a.method + " adapter, " + fmtBytes(a.bytes) : "no adapter yet";
    $("adapter-label").textContent = "(" + label + ")";
    setStatus(status, "Signed in as " + me.user + " · " + label + (a ? "." :
      ": upload one with PUT /v1/users/" + me.user + "/adapter; the bare base works meanwhile."), "ok");
    $("chat-input").focus();
  }

  // ---- chat ----------------------------------------------------------------------------------------------
  function bubble(side, role, text) {
    const b = el("div", "msg " + role);
    b.append(el("div", "who", role === "user" ? "you" : side === "user" ? "your adapter" : "bare base"));
    const body = el("div", "text", text);
    b.append(body);
    $("log-" + side).append(b);
    b.scrollIntoView({ block: "end" });
    return { b, body };
  }

  function numberField(id, lo, hi, integer) {
    const v = Number($(id).value);
    if (!Number.isFinite(v) || v < lo || v > hi || (integer && !Number.isInteger(v))) return null;
    return v;
  }

  async function streamSide(side, request, signal) {
    const { b, body } = bubble(side, "assistant", "");
    b.dataset.state = "streaming";
    b.dataset.chunks = "0";
    let text = "", chunks = 0;
    const finish = (st, note) => {
      b.dataset.state = st;
      if (note) b.append(el("div", st === "error" ? "err" : "info", note));
    };
    let resp;
    try {
      resp = await api("/v1/chat/completions", { ...request, adapter: side, stream: true }, signal);
    } catch (e) {
      state.history[side].pop();
      if (signal.aborted) finish("stopped", "stopped");
      else finish("error", "No answer from the server: " + e.message);
      return;
    }
    if (!resp.ok) {
      state.history[side].pop(); // that turn did not happen on this side
      finish("error", await errorText(resp));
      return;
    }
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let buf = "", done = false, failed = null;
    try {
      while (!done) {
        const { value, done: end } = await reader.read();
        if (end) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while (!done && (i = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, i);
          buf = buf.slice(i + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { done = true; break; }
            const obj = JSON.parse(data);
            if (obj.error) { failed = obj.error.message || "the request failed"; continue; }
            const choice = (obj.choices || [])[0];
            if (!choice) continue;
            const piece = choice.delta && choice.delta.content;
            if (piece) {
              text += piece;
              body.textContent = text;
              b.dataset.chunks = String(++chunks);
              b.scrollIntoView({ block: "end" });
            }
            if (choice.finish_reason) b.dataset.finish = choice.finish_reason;
          }
        }
      }
    } catch (e) {
      if (!signal.aborted) failed = "The stream broke: " + e.message;
    }
    state.history[side].push({ role: "assistant", content: text });
    if (failed) finish("error", failed);
    else if (signal.aborted) finish("stopped", "stopped");
    else finish("done", b.dataset.finish === "length" ? "(max tokens reached)" : "");
  }

  async function sendChat(ev) {
    ev.preventDefault();
    const input = $("chat-input");
    const content = input.value;
    if (!content.trim() || $("chat-send").disabled) return; // one turn at a time: each side's history stays in order
    if (!state.token) { setStatus($("token-status"), "Paste a token first.", "error"); $("token").focus(); return; }
    const maxTokens = numberField("max-tokens", 1, 1024, true);
    const temperature = numberField("temperature", 0, 5, false);
    const seedText = $("seed").value.trim();
    const seed = seedText === "" ? undefined : numberField("seed", 0, Number.MAX_SAFE_INTEGER, true);
    if (maxTokens === null || temperature === null || seed === null) {
      setStatus($("token-status"), "max tokens: an integer from 1 to 1024; temperature: 0 to 5; seed: empty or " +
        "a whole number from 0.", "error");
      return;
    }
    input.value = "";
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    const ctl = new AbortController();
    state.controllers.push(ctl);
    const runs = SIDES.map((side) => {
      state.history[side].push({ role: "user", content });
      bubble(side, "user", content);
      const request = { messages: state.history[side].slice(), max_tokens: maxTokens, temperature, seed };
      return streamSide(side, request, ctl.signal);
    });
    await Promise.allSettled(runs);
    state.controllers = state.controllers.filter((c) => c !== ctl);
    $("chat-send").disabled = false;
    $("chat-stop").disabled = state.controllers.length === 0;
  }

  function stopChat() {
    for (const c of state.controllers) c.abort();
  }

  function clearChat() {
    stopChat();
    for (const side of SIDES) { state.history[side] = []; $("log-" + side).replaceChildren(); }
  }

  // ---- surprise ------------------------------------------------------------------------------------------
  const MAX_NATS = 10; // full colour at 10 nats (p ~ 4.5e-5) and beyond

  function heat(nats) {
    const a = Math.max(0, Math.min(1, nats / MAX_NATS));
    return "rgba(220, 38, 38, " + (0.08 + 0.8 * a).toFixed(3) + ")";
  }

  function diffColour(d) { // d = base surprise - adapter surprise (nats); > 0: the adapter is less surprised
    const a = Math.min(1, Math.abs(d) / 3);
    return (d >= 0 ? "rgba(22, 163, 74, " : "rgba(220, 38, 38, ") + (0.85 * a).toFixed(3) + ")";
  }

  function visible(tok) {
    return tok.replace(/\n/g, "↵\n");
  }

  function renderTokens(box, tokens, values, colour, describe) {
    box.replaceChildren();
    tokens.forEach((tok, i) => {
      const s = el("span", "tok", visible(tok));
      const v = values[i];
      if (v === null || v === undefined) {
        s.classList.add("none");
      } else {
        s.style.backgroundColor = colour(v);
        s.dataset.value = v.toFixed(4);
        s.title = describe(tok, v);
      }
      box.append(s);
    });
  }

  function renderLegend() {
    const lg = $("legend");
    lg.append(el("span", "muted", "surprise "));
    for (const n of [0, 2, 4, 6, 8, 10]) {
      const s = el("span", "tok", n === 10 ? "≥10" : String(n));
      s.style.backgroundColor = heat(n);
      lg.append(s);
    }
    lg.append(el("span", "muted", " nats"));
  }

  async function scoreSide(side, text) {
    const ppl = $("ppl-" + side), box = $("tokens-" + side);
    ppl.textContent = "…";
    delete ppl.dataset.ppl;
    box.replaceChildren();
    const r = await api("/v1/score", { text, adapter: side });
    if (!r.ok) {
      ppl.textContent = "";
      box.append(el("p", "err", await errorText(r)));
      return null;
    }
    const s = await r.json();
    ppl.textContent = "ppl " + fmtNum(s.ppl, 3) + " · " + s.tokens + " tokens";
    ppl.dataset.ppl = String(s.ppl);
    // Per-token values: the legacy completions endpoint with echo (the prompt's own tokens and logprobs).
    const e = await api("/v1/completions", { prompt: text, echo: true, max_tokens: 0, logprobs: 1, adapter: side });
    let lp = null;
    if (e.ok) {
      const j = await e.json();
      lp = j.choices && j.choices[0] && j.choices[0].logprobs;
    }
    if (!lp || !Array.isArray(lp.tokens) || !Array.isArray(lp.token_logprobs)) {
      box.append(el("span", "plain", text));
      return { perToken: false, status: e.status };
    }
    const nats = lp.token_logprobs.map((x) => (x === null ? null : -x));
    renderTokens(box, lp.tokens, nats, heat,
      (tok, v) => JSON.stringify(tok) + ": " + v.toFixed(2) + " nats (p = " + Math.exp(-v).toPrecision(3) + ")");
    return { perToken: true, tokens: lp.tokens, nats };
  }

  async function score(ev) {
    ev.preventDefault();
    const text = $("score-input").value;
    if (!text) return;
    if (!state.token) { setStatus($("token-status"), "Paste a token first.", "error"); $("token").focus(); return; }
    $("score-go").disabled = true;
    const note = $("score-note");
    note.hidden = true;
    $("diff-box").hidden = true;
    try {
      const [mine, base] = await Promise.all(SIDES.map((side) => scoreSide(side, text)));
      if (mine && base && mine.perToken && base.perToken && mine.tokens.length === base.tokens.length) {
        const d = base.nats.map((b, i) => (b === null || mine.nats[i] === null ? null : b - mine.nats[i]));
        renderTokens($("tokens-diff"), mine.tokens, d, diffColour,
          (tok, v) => JSON.stringify(tok) + ": " + (v >= 0 ? v.toFixed(2) + " nats less surprised" :
            (-v).toFixed(2) + " nats more surprised") + " under your adapter");
        $("diff-box").hidden = false;
      } else if ((mine && !mine.perToken) || (base && !base.perToken)) {
        note.textContent = "Per-token surprise needs logprobs with echo on /v1/completions, which this server " +
          "does not offer (it answered " + ((mine || base).status) + "): the ppl shown are /v1/score's totals, " +
          "and the text is shown uncoloured.";
        note.hidden = false;
      }
    } catch (e) {
      note.textContent = "No answer from the server: " + e.message;
      note.hidden = false;
    } finally {
      $("score-go").disabled = false;
    }
  }

  // ---- admin ---------------------------------------------------------------------------------------------
  function renderUsers(info) {
    const tbody = $("users").tBodies[0];
    tbody.replaceChildren();
    for (const u of info.users) {
      const a = u.adapter;
      const tr = el("tr");
      tr.dataset.user = u.user;
      const cells = a ? [u.user, a.method, a.scheme, fmtNum(a.params, 0), fmtBytes(a.bytes), fmtTime(a.updated),
        a.cached ? "yes" : "no"] : [u.user, "no adapter", "", "", "", "", ""];
      for (const c of cells) tr.append(el("td", null, c));
      if (a) tr.lastChild.className = a.cached ? "yes" : "no";
      tbody.append(tr);
    }
    $("users-count").textContent = info.total + " users" +
      (info.total > info.users.length ? " (the first " + info.users.length + " shown)" : "");
  }

  async function loadHealth() {
    const h = await loadServer();
    const dl = $("health");
    dl.replaceChildren();
    if (!h) return;
    for (const [k, v] of Object.entries(h)) {
      const pair = el("div");
      pair.append(el("dt", null, k.replace(/_/g, " ")),
        el("dd", null, k.endsWith("_bytes") ? fmtBytes(v) : typeof v === "number" ? fmtNum(v, 3) : v));
      dl.append(pair);
    }
  }

  async function refreshAdmin() {
    const r = await api("/v1/users");
    if (!r.ok) { setStatus($("token-status"), await errorText(r), "error"); return; }
    renderUsers(await r.json());
    await loadHealth();
  }

  // ---- wiring --------------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("token-form").addEventListener("submit", useToken);
    $("chat-form").addEventListener("submit", sendChat);
    $("chat-input").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $("chat-form").requestSubmit();
      }
    });
    $("chat-stop").addEventListener("click", stopChat);
    $("chat-clear").addEventListener("click", clearChat);
    $("score-form").addEventListener("submit", score);
    $("admin-refresh").addEventListener("click", refreshAdmin);
    renderLegend();
    loadServer();
  });
})();
