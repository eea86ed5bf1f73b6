// covey's chat page: streams answers from POST /apps/rag_chatbot/stream (server-sent
// events: `node`, `token`, then `result` or `error`), shows the sources each answer cites
// with their text, and keeps the session id (and the transcript) in localStorage so a
// reload continues the same conversation. No build step, no dependencies.
"use strict";

(() => {
  const APP = "/apps/rag_chatbot";
  const KEY = { session: "covey.chat.session", log: "covey.chat.log", apiKey: "covey.apiKey" };
  const KEPT_TURNS = 20;

  const $ = (id) => document.getElementById(id);
  const logEl = $("log");
  const form = $("ask");
  const input = $("question");
  const sendBtn = $("send");
  const resetBtn = $("reset");
  let turns = loadTurns();
  let busy = false;

  function loadTurns() {
    try {
      const saved = JSON.parse(localStorage.getItem(KEY.log) || "[]");
      return Array.isArray(saved) ? saved : [];
    } catch {
      return [];
    }
  }

  function saveTurns() {
    turns = turns.slice(-KEPT_TURNS);
    localStorage.setItem(KEY.log, JSON.stringify(turns));
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showSession() {
    const sid = localStorage.getItem(KEY.session);
    $("session").textContent = sid ? `session ${sid.slice(0, 8)}` : "new session";
    $("session").title = sid || "";
  }

  function esc(text) {
    return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }

  // The answer as HTML: code fences and inline code kept verbatim, [n] linked to source n.
  function formatAnswer(text, turnId, numbers) {
    return text
      .split("```")
      .map((part, i) => {
        if (i % 2 === 1) {
          return `<pre><code>${esc(part.replace(/^[\w+-]*\n/, ""))}</code></pre>`;
        }
        let html = esc(part).replace(/`([^`\n]+)`/g, "<code>$1</code>");
        html = html.replace(/\[(\d+(?:\s*,\s*\d+)*)\]/g, (whole, list) => {
          const ns = list.split(",").map((n) => Number(n.trim()));
          if (!ns.every((n) => numbers.has(n))) return whole;
          return ns.map((n) => `<a class="cite" href="#s-${turnId}-${n}" data-n="${n}">[${n}]</a>`).join("");
        });
        return html.replace(/\n/g, "<br>");
      })
      .join("");
  }

  let nextTurnId = 0;

  // One question and its answer on the page; returns handles to fill it in as it streams.
  function renderTurn(turn, streaming) {
    $("empty").hidden = true;
    const id = nextTurnId++;
    const section = document.createElement("section");
    section.className = "turn";
    section.innerHTML = `
      <div class="msg user"></div>
      <div class="msg bot">
        <div class="answer"></div>
        <div class="sources" hidden></div>
      </div>`;
    section.querySelector(".user").textContent = turn.question;
    const answerEl = section.querySelector(".answer");
    const sourcesEl = section.querySelector(".sources");
    logEl.appendChild(section);

    const view = {
      stream(text) {
        answerEl.textContent = text;
        answerEl.classList.add("streaming");
        scrollDown();
      },
      finish(done) {
        const numbers = new Set(done.citations.map((c) => c.n));
        answerEl.classList.remove("streaming");
        answerEl.innerHTML = formatAnswer(done.answer || "(no answer)", id, numbers);
        renderSources(sourcesEl, done, id);
        scrollDown();
      },
      fail(message) {
        answerEl.classList.remove("streaming");
        answerEl.classList.add("error");
        answerEl.textContent = `Error: ${message}`;
      },
    };
    if (streaming) {
      answerEl.classList.add("streaming", "waiting");
    } else if (turn.error) {
      view.fail(turn.error);
    } else {
      view.finish(turn);
    }
    return { view, answerEl };
  }

  function renderSources(el, turn, turnId) {
    if (!turn.citations || !turn.citations.length) return;
    const heading = turn.cited ? "Sources" : "Retrieved passages (none cited)";
    el.innerHTML = `<div class="sources-title">${heading}</div>`;
    for (const c of turn.citations) {
      const card = document.createElement("div");
      card.className = "source";
      card.id = `s-${turnId}-${Number(c.n)}`;
      card.innerHTML = `
        <div class="source-head"><span class="n">[${Number(c.n)}]</span> <span class="src"></span></div>
        <p class="source-text"></p>`;
      card.querySelector(".src").textContent = c.source;
      card.querySelector(".source-text").textContent = c.text;
      card.title = "Click to show the whole passage";
      card.addEventListener("click", () => card.classList.toggle("open"));
      el.appendChild(card);
    }
    el.hidden = false;
    el.parentElement.querySelectorAll("a.cite").forEach((a) => {
      a.addEventListener("click", (event) => {
        event.preventDefault();
        const card = document.getElementById(a.getAttribute("href").slice(1));
        if (!card) return;
        card.classList.add("open", "flash");
        card.scrollIntoView({ behavior: "smooth", block: "nearest" });
        setTimeout(() => card.classList.remove("flash"), 1200);
      });
    });
  }

  function scrollDown() {
    window.scrollTo(0, document.body.scrollHeight);
  }

  function headers() {
    const h = { "Content-Type": "application/json", Accept: "text/event-stream" };
    const key = localStorage.getItem(KEY.apiKey);
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // POST as JSON; on 401 ask for the server's API key once, remember it, and retry.
  async function post(path, body) {
    for (let asked = false; ; asked = true) {
      const res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
      if (res.status !== 401 || asked) return res;
      const key = window.prompt("This covey server needs an API key (--api-key):");
      if (!key) return res;
      localStorage.setItem(KEY.apiKey, key.trim());
    }
  }

  async function errorText(res) {
    try {
      const data = await res.json();
      if (data.error && data.error.message) return data.error.message;
      if (Array.isArray(data.detail)) return data.detail.map((d) => d.msg).join("; ");
      if (data.detail) return String(data.detail);
    } catch {
      // not JSON: fall through to the status
    }
    return `the server answered HTTP ${res.status}`;
  }

  // Server-sent events from a fetch response body, parsed as they arrive.
  async function* events(res) {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let at;
      while ((at = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, at);
        buffer = buffer.slice(at + 2);
        let event = "message";
        let data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trimStart();
        }
        if (data) yield { event, data: JSON.parse(data) };
      }
    }
  }

  function nodeStatus(node) {
    const kind = `${node.kind} ${node.node}`;
    if (/retriev|search/.test(kind)) return "searching the docs…";
    if (/format|passage/.test(kind)) return "reading the passages…";
    return "thinking…";
  }

  async function ask(question) {
    busy = true;
    sendBtn.disabled = resetBtn.disabled = true;
    const turn = { question, answer: "", citations: [], cited: false };
    const { view, answerEl } = renderTurn(turn, true);
    scrollDown();
    const body = { question };
    const sid = localStorage.getItem(KEY.session);
    if (sid) body.session_id = sid;
    setStatus("sending…");
    try {
      const res = await post(`${APP}/stream`, body);
      if (!res.ok) throw new Error(await errorText(res));
      let finished = false;
      for await (const { event, data } of events(res)) {
        if (event === "token") {
          answerEl.classList.remove("waiting");
          answerEl.dataset.tokens = String(Number(answerEl.dataset.tokens || 0) + 1);
          turn.answer += data.text;
          view.stream(turn.answer);
          setStatus("answering…");
        } else if (event === "node" && data.status === "started") {
          setStatus(nodeStatus(data));
        } else if (event === "result") {
          const out = data.outputs;
          Object.assign(turn, { answer: out.answer, citations: out.citations, cited: out.cited });
          localStorage.setItem(KEY.session, out.session_id);
          view.finish(turn);
          finished = true;
        } else if (event === "error") {
          throw new Error(data.error.message);
        }
      }
      if (!finished) throw new Error("the answer stream ended before the answer did");
    } catch (err) {
      turn.error = err.message || String(err);
      view.fail(turn.error);
    } finally {
      turns.push(turn);
      saveTurns();
      busy = false;
      sendBtn.disabled = resetBtn.disabled = false;
      setStatus("ready");
      showSession();
      input.focus();
    }
  }

  async function reset() {
    const sid = localStorage.getItem(KEY.session);
    localStorage.removeItem(KEY.session);
    localStorage.removeItem(KEY.log);
    turns = [];
    logEl.querySelectorAll(".turn").forEach((el) => el.remove());
    $("empty").hidden = false;
    showSession();
    if (!sid) return;
    setStatus("starting over…");
    try {
      const res = await post(`${APP}/reset`, { session_id: sid });
      setStatus(res.ok ? "conversation cleared" : await errorText(res));
    } catch (err) {
      setStatus(`could not reach the server: ${err.message}`);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const question = input.value.trim();
    if (!question || busy) return;
    input.value = "";
    grow();
    ask(question);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  function grow() {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
    input.style.overflowY = input.scrollHeight > 160 ? "auto" : "hidden";
  }
  input.addEventListener("input", grow);
  resetBtn.addEventListener("click", () => {
    if (!busy) reset();
  });

  for (const turn of turns) renderTurn(turn, false);
  showSession();
  input.focus();
})();
