// The playground: models and their state (live from /admin/events), load and unload, and a
// streaming chat. Every call carries the key the user gave; keys live in sessionStorage,
// so they last for this tab only. All text from the server reaches the page as text nodes.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEYS = { api: "llmgw.apiKey", admin: "llmgw.adminKey" };
  const models = new Map(); // name -> model card from /v1/models, updated by events
  let history = []; // the conversation, as OpenAI messages (without the system prompt)
  let inFlight = null; // the AbortController of the streaming reply, while one runs
  let events = null; // the AbortController of the event stream
  let refreshTimer = null;

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  // -- keys and requests -------------------------------------------------------------------

  function key(which) {
    return sessionStorage.getItem(KEYS[which]) || "";
  }

  function adminKey() {
    return key("admin") || key("api");
  }

  function headers(token, json) {
    const out = {};
    if (token) out.Authorization = "Bearer " + token;
    if (json) out["Content-Type"] = "application/json";
    return out;
  }

  async function failure(response) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      // not JSON: the status line says enough
    }
    return new ApiError(response.status, message);
  }

  async function api(path, { method = "GET", body, admin = false, signal } = {}) {
    const response = await fetch(path, {
      method,
      headers: headers(admin ? adminKey() : key("api"), body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    if (!response.ok) throw await failure(response);
    return response;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function askForKeys(why, field) {
    $("keys").hidden = false;
    $("keys-why").textContent = why + " Keys stay in this tab only (session storage).";
    $(field).focus();
  }

  function authProblem(error, admin) {
    if (!(error instanceof ApiError) || (error.status !== 401 && error.status !== 403)) return false;
    const which = admin ? "admin key" : "API key";
    const given = admin ? adminKey() : key("api");
    const why = given ? `The gateway refused the ${which}: ${error.message}.` : `This needs an ${which}.`;
    showError(why);
    askForKeys(why, admin ? "admin-key" : "api-key");
    return true;
  }

  // -- models ------------------------------------------------------------------------------

  function bytes(n) {
    if (!n) return null;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function memory(card) {
    const m = card.memory || {};
    const held = m.held_bytes || m.estimated_bytes;
    if (!held) return "—";
    const total = Object.values(held).reduce((a, b) => a + b, 0);
    const where = Object.entries(held).map(([d, b]) => `${d}: ${bytes(b)}`).join(", ");
    return `${bytes(total)} (${where})`;
  }

  function device(card) {
    return Array.isArray(card.devices) ? "GPU " + card.devices.join(", ") : String(card.devices);
  }

  function modelItem(card) {
    const item = document.createElement("li");
    item.className = "model";
    item.dataset.model = card.id;
    const title = document.createElement("h3");
    title.textContent = card.id + (card.default ? " (default)" : "");
    const facts = document.createElement("dl");
    const state = card.state + (card.progress && card.state === "starting" && card.progress.message ? ": " + card.progress.message : "");
    for (const [name, value, cls] of [
      ["State", state, "state state-" + card.state],
      ["Device", device(card)],
      ["Memory", memory(card)],
      ["Last error", card.last_error || "—"],
    ]) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.field = name.toLowerCase().replace(" ", "-");
      if (cls) dd.className = cls;
      facts.append(dt, dd);
    }
    item.append(title, facts, modelButtons(card));
    return item;
  }

  function modelButtons(card) {
    const row = document.createElement("div");
    row.className = "row";
    for (const action of ["load", "unload"]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = action === "load" ? "" : "secondary";
      button.textContent = action === "load" ? "Load" : "Unload";
      button.setAttribute("aria-label", `${button.textContent} ${card.id}`);
      button.dataset.action = action;
      const busy = card.state === "starting" || card.state === "draining";
      button.disabled = busy || (action === "load" ? card.state === "ready" : card.state === "unloaded");
      button.addEventListener("click", () => lifecycle(card.id, action));
      row.append(button);
    }
    return row;
  }

  function renderModels() {
    const list = $("model-list");
    const focused = document.activeElement && document.activeElement.closest("[data-model]");
    const refocus = focused && [focused.dataset.model, document.activeElement.dataset.action];
    list.replaceChildren(...[...models.values()].map(modelItem));
    if (refocus) {
      const again = list.querySelector(`[data-model="${CSS.escape(refocus[0])}"] [data-action="${refocus[1]}"]`);
      if (again && !again.disabled) again.focus();
      else if (again) again.closest(".model").querySelector("button:not(:disabled)")?.focus();
    }
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(
      ...[...models.values()].map((card) => new Option(card.id, card.id, false, card.id === chosen || (!chosen && card.default)))
    );
    $("connection").textContent = `${models.size} model${models.size === 1 ? "" : "s"} at ${location.host}`;
  }

  async function refreshModels() {
    try {
      const data = await (await api("/v1/models")).json();
      models.clear();
      for (const card of data.data) models.set(card.id, card);
      renderModels();
      return true;
    } catch (error) {
      if (!authProblem(error, false)) showError("Could not list the models: " + error.message);
      $("connection").textContent = "Not connected";
      return false;
    }
  }

  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshModels, 150);
  }

  async function lifecycle(name, action) {
    try {
      const card = await (await api(`/admin/models/${encodeURIComponent(name)}/${action}`, { method: "POST", admin: true })).json();
      const old = models.get(name) || {};
      models.set(name, { ...old, ...card, id: name });
      renderModels();
      showError("");
    } catch (error) {
      if (!authProblem(error, true)) showError(`Could not ${action} ${name}: ${error.message}`);
    }
    refreshSoon();
  }

  // -- the event stream (fetch, not EventSource: EventSource cannot send a key) ------------

  function onEvent(event) {
    if (event.type === "state" && models.has(event.model)) {
      const card = models.get(event.model);
      models.set(event.model, { ...card, state: event.state, last_error: event.error ?? card.last_error });
      renderModels();
    }
    refreshSoon(); // for the details an event does not carry (memory, progress, devices)
  }

  async function readEvents(signal) {
    const response = await api("/admin/events", { admin: true, signal });
    $("live").textContent = "Live: state changes appear as they happen.";
    for await (const event of chunks(response)) onEvent(event); // one SSE reader for both
  }

  async function watchEvents() {
    if (events) events.abort();
    const controller = new AbortController();
    events = controller;
    while (!controller.signal.aborted) {
      try {
        await readEvents(controller.signal);
      } catch (error) {
        if (controller.signal.aborted) return;
        if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
          $("live").textContent = "Live updates need the admin key; the list refreshes every 5 s.";
        } else {
          $("live").textContent = "Live updates lost; reconnecting…";
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 5000));
      if (!controller.signal.aborted) await refreshModels();
    }
  }

  // -- chat --------------------------------------------------------------------------------

  function turn(role, text) {
    const box = document.createElement("div");
    box.className = "turn " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("div");
    body.className = "body";
    if (role === "user") body.textContent = text;
    const stats = document.createElement("div");
    stats.className = "stats";
    box.append(who, body, stats);
    $("log").append(box);
    $("log").scrollTop = $("log").scrollHeight;
    return { box, body, stats };
  }

  function settings() {
    const temperature = $("temperature").value.trim();
    const maxTokens = $("max-tokens").value.trim();
    return {
      model: $("model").value,
      system: $("system").value.trim(),
      temperature: temperature === "" ? undefined : Number(temperature),
      max_tokens: maxTokens === "" ? undefined : Number(maxTokens),
    };
  }

  function chatBody(chosen) {
    const messages = chosen.system ? [{ role: "system", content: chosen.system }] : [];
    return {
      model: chosen.model,
      messages: messages.concat(history),
      stream: true,
      stream_options: { include_usage: true },
      temperature: chosen.temperature,
      max_tokens: chosen.max_tokens,
    };
  }

  async function* chunks(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    }
  }

  function statsLine(started, first, finished, usage) {
    const parts = [];
    if (first !== null) parts.push(`first token ${Math.round(first - started)} ms`);
    if (usage && first !== null && finished > first && usage.completion_tokens > 1) {
      // Tokens after the first, over the time they took: the decoding speed.
      const rate = (usage.completion_tokens - 1) / ((finished - first) / 1000);
      parts.push(`${rate.toFixed(1)} tokens/s`);
    }
    if (usage) parts.push(`${usage.prompt_tokens} + ${usage.completion_tokens} = ${usage.total_tokens} tokens`);
    return parts.join(" · ");
  }

  async function send() {
    const prompt = $("prompt").value;
    const chosen = settings();
    if (!prompt.trim() || inFlight || !chosen.model) return;
    showError("");
    history.push({ role: "user", content: prompt });
    $("prompt").value = "";
    turn("user", prompt);
    showCurl(chosen, prompt, history.slice(0, -1));
    const reply = turn("assistant");
    reply.box.setAttribute("aria-busy", "true");
    const controller = new AbortController();
    inFlight = controller;
    $("send").disabled = true;
    $("stop").disabled = false;
    let text = "";
    let usage = null;
    let first = null;
    const started = performance.now();
    let outcome = "";
    try {
      const response = await api("/v1/chat/completions", { method: "POST", body: chatBody(chosen), signal: controller.signal });
      for await (const chunk of chunks(response)) {
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          text += delta.content;
          reply.body.replaceChildren(window.renderMarkdown(text));
          $("log").scrollTop = $("log").scrollHeight;
        }
      }
    } catch (error) {
      if (controller.signal.aborted) outcome = "stopped";
      else {
        outcome = "failed: " + error.message;
        if (!authProblem(error, false)) showError("The reply failed: " + error.message);
      }
    } finally {
      const finished = performance.now();
      // A reply stopped before its first word leaves no turn behind, nor its question.
      if (text) history.push({ role: "assistant", content: text });
      else history.pop();
      reply.stats.textContent = [statsLine(started, first, finished, usage), outcome].filter(Boolean).join(" · ");
      if (outcome.startsWith("failed")) reply.stats.classList.add("failed");
      reply.box.dataset.outcome = outcome || "done";
      reply.box.setAttribute("aria-busy", "false");
      inFlight = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      $("prompt").focus();
    }
  }

  // -- the seed API equivalent -------------------------------------------------------------

  function shellQuote(text) {
    return "'" + String(text).replace(/'/g, "'\\''") + "'";
  }

  function showCurl(chosen, prompt, before) {
    const body = { prompt };
    if (chosen.system) body.system = chosen.system;
    if (before.length) body.history = before;
    if (chosen.max_tokens !== undefined) body.max_length = chosen.max_tokens;
    if (chosen.temperature !== undefined) body.temperature = chosen.temperature;
    const lines = ["curl " + shellQuote(`${location.origin}/${encodeURIComponent(chosen.model)}`)];
    if (key("api")) lines.push("-H " + shellQuote("Authorization: Bearer " + key("api")));
    lines.push("-H 'Content-Type: application/json'");
    lines.push("-d " + shellQuote(JSON.stringify(body)));
    $("curl").textContent = lines.join(" \\\n  ");
  }

  // -- wiring ------------------------------------------------------------------------------

  function saveKeys(event) {
    event.preventDefault();
    for (const which of ["api", "admin"]) {
      const value = $(which + "-key").value.trim();
      if (value) sessionStorage.setItem(KEYS[which], value);
      else sessionStorage.removeItem(KEYS[which]);
    }
    start();
  }

  function forgetKeys() {
    sessionStorage.removeItem(KEYS.api);
    sessionStorage.removeItem(KEYS.admin);
    $("api-key").value = "";
    $("admin-key").value = "";
    start();
  }

  async function start() {
    if (events) events.abort(); // it may hold keys that were just changed or forgotten
    events = null;
    showError("");
    $("api-key").value = key("api");
    $("admin-key").value = key("admin");
    if (await refreshModels()) {
      $("keys").hidden = true;
      watchEvents();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("keys-form").addEventListener("submit", saveKeys);
    $("forget-keys").addEventListener("click", forgetKeys);
    $("show-keys").addEventListener("click", () => {
      $("keys").hidden = false;
      $("api-key").focus();
    });
    $("chat-form").addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      }
    });
    $("stop").addEventListener("click", () => inFlight && inFlight.abort());
    $("clear").addEventListener("click", () => {
      if (inFlight) inFlight.abort();
      history = [];
      $("log").replaceChildren();
    });
    $("copy-curl").addEventListener("click", () => navigator.clipboard?.writeText($("curl").textContent));
    start();
  });
})();
