// vlmhub's web page: plain JavaScript, no dependencies, no external requests.
// Reads GET /api/ui once (GPU, presets), polls GET /api/models, calls POST
// /api/models/{name}/load|unload and streams POST /v1/chat/completions. Shares its helpers
// with ocr.js (the OCR playground) and panels.js (engine logs, the last hour) as
// window.vlmhub.
// Everything shown comes from the server and is inserted as text (never as HTML).
"use strict";

(() => {
  const POLL_MS = 1500;
  const HOLDS_FULL = new Set(["ready", "starting", "stopping"]);
  const PALETTE = ["#2f6fde", "#d9480f", "#2b8a3e", "#8e44ad", "#c2255c", "#0c8599",
                   "#b08900", "#5f3dc4", "#e8590c", "#1971c2"];
  const KEYS = { api: "vlmhub.apiKey", admin: "vlmhub.adminKey" };

  const $ = (id) => document.getElementById(id);
  const ui = { info: null, models: [], colours: new Map(), busy: new Set(), image: null,
               abort: null, pollTimer: null, picked: false,
               polling: false, again: false, listeners: [] };

  // ---------------------------------------------------------------- helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) node.append(c);
    return node;
  }

  const gib = (x) => (x === null || x === undefined ? "–" : `${Number(x).toFixed(2)} GiB`);
  const secs = (x) => (x === null || x === undefined ? "–" : `${Number(x).toFixed(1)} s`);

  function key(which) {
    try { return sessionStorage.getItem(KEYS[which]) || ""; } catch (_) { return ""; }
  }

  function setKey(which, value) {
    try {
      if (value) sessionStorage.setItem(KEYS[which], value);
      else sessionStorage.removeItem(KEYS[which]);
    } catch (_) { /* storage disabled: the key lives in the field only */ }
  }

  function headers(which, json) {
    const h = {};
    const k = key(which) || $(which === "api" ? "api-key" : "admin-key").value.trim();
    if (k) h.Authorization = `Bearer ${k}`;
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  // An error with a headline ("503 · service_unavailable · load_failed") and a message.
  class ApiError extends Error {
    constructor(headline, message, status) {
      super(message);
      this.headline = headline;
      this.status = status || 0;
    }
  }

  // An OpenAI-shaped error ({"error": {"message", "type", "code"}}) -> ApiError.
  function apiError(status, err, fallback) {
    if (err && typeof err === "object" && err.message) {
      const tags = [status, err.type, err.code].filter((x) => x !== null && x !== undefined && x !== "");
      return new ApiError(tags.join(" · "), String(err.message), status);
    }
    return new ApiError(String(status || "error"), fallback, status);
  }

  async function errorOf(resp) {
    let text = "";
    try { text = await resp.text(); } catch (_) { /* body unreadable */ }
    let err = null;
    try { err = JSON.parse(text).error; } catch (_) { /* not JSON */ }
    return apiError(resp.status, err, `${resp.statusText || "HTTP error"}${text ? `: ${text.slice(0, 500)}` : ""}`);
  }

  const oneLine = (exc) => (exc.headline ? `${exc.headline}: ${exc.message}` : exc.message);

  function openKeys() {
    $("keys").open = true;
    $("admin-key").focus();
  }

  // The page-wide problem (or none): admin rights missing, or the router unreachable.
  function banner(exc) {
    const b = $("banner");
    b.replaceChildren();
    b.hidden = !exc;
    if (!exc) return;
    if (exc.status === 401 || exc.status === 403) {
      const button = el("button", { type: "button", class: "small" }, "Enter the admin key");
      button.addEventListener("click", openKeys);
      b.append(el("strong", { text: "The model list needs admin rights. " }),
               el("span", { text: exc.message + " " }), button);
    } else {
      b.append(el("strong", { text: "The router does not answer. " }),
               el("span", { text: `${oneLine(exc)} (retrying every ${POLL_MS / 1000} s)` }));
    }
  }

  function tableMessage(text) {
    $("models-body").replaceChildren(
      el("tr", {}, el("td", { colspan: 9, class: "muted", text })));
  }

  function colour(name) {
    if (!ui.colours.has(name)) ui.colours.set(name, PALETTE[ui.colours.size % PALETTE.length]);
    return ui.colours.get(name);
  }

  // ---------------------------------------------------------------- data
  // Without admin rights the "Try it" panel still gets the model names from /v1/models.
  async function fallbackInfo() {
    const resp = await fetch("/v1/models", { headers: headers("api"), cache: "no-store" });
    if (!resp.ok) return null;
    const data = (await resp.json()).data || [];
    return { gpu: null, partial: true, models: data.map((m) => ({
      name: m.id, aliases: m.aliases || [], capabilities: [], presets: {}, default_preset: null,
      budget_gib: 0, sleep_gib: 0, max_model_len: m.max_model_len || null, external: false,
      state: m.state })) };
  }

  async function loadInfo() {
    const resp = await fetch("/api/ui", { headers: headers("admin"), cache: "no-store" });
    if (!resp.ok) {
      const denied = await errorOf(resp);
      if (!ui.info) {
        ui.info = await fallbackInfo();
        if (ui.info) fillModelSelect();
      }
      throw denied;
    }
    ui.info = await resp.json();
    for (const m of ui.info.models) colour(m.name);
    const g = ui.info.gpu;
    $("gpu-name").textContent = g ? `${g.name}: ${gib(g.total_gib)} total` : "GPU size unknown";
    fillModelSelect();
  }

  async function poll() {
    if (ui.polling) { // one poll at a time: run again right after this one
      ui.again = true;
      return;
    }
    ui.polling = true;
    clearTimeout(ui.pollTimer);
    try {
      if (!ui.info || ui.info.partial) await loadInfo();
      const resp = await fetch("/api/models", { headers: headers("admin"), cache: "no-store" });
      if (!resp.ok) throw await errorOf(resp);
      const first = !ui.models.length;
      ui.models = (await resp.json()).models;
      if (first) fillModelSelect();
      banner(null);
      $("conn").textContent = `updated ${new Date().toLocaleTimeString()}`;
      $("conn").className = "conn ok";
      render();
    } catch (exc) {
      const denied = exc.status === 401 || exc.status === 403;
      $("conn").textContent = denied ? "no admin rights" : "not connected";
      $("conn").className = "conn bad";
      banner(exc);
      if (!ui.models.length) tableMessage(denied ? "needs the admin key" : "no answer");
    } finally {
      ui.polling = false;
      ui.pollTimer = setTimeout(poll, ui.again ? 0 : POLL_MS);
      ui.again = false;
    }
  }

  function infoOf(name) {
    return ui.info ? ui.info.models.find((m) => m.name === name) : undefined;
  }

  // ---------------------------------------------------------------- GPU bar
  function held(m) {
    if (HOLDS_FULL.has(m.state)) return { gib: m.budget_gib, kind: m.state };
    if (m.state === "sleeping") {
      const i = infoOf(m.name);
      return { gib: i ? i.sleep_gib : 0, kind: "sleeping" };
    }
    return { gib: 0, kind: m.state };
  }

  function renderGpu() {
    const usable = ui.info && ui.info.gpu ? ui.info.gpu.usable_gib : null;
    const scale = usable || ui.models.reduce((s, m) => s + m.budget_gib, 0) || 1;
    const segs = $("gpu-segments");
    const legend = $("gpu-legend");
    segs.replaceChildren();
    legend.replaceChildren();
    let total = 0;
    const parts = [];
    for (const m of ui.models) {
      const h = held(m);
      if (!h.gib || m.external) continue;
      total += h.gib;
      const pct = Math.max(0, Math.min(100, (h.gib / scale) * 100));
      const label = `${m.name}: ${gib(h.gib)} (${h.kind})`;
      parts.push(label);
      const seg = el("div", { class: `seg ${h.kind}`, title: label },
                     el("span", { class: "seg-label", text: pct > 9 ? m.name : "" }));
      seg.style.width = `${pct}%`; // CSSOM, not a style attribute: allowed by the page's CSP
      seg.style.setProperty("--c", colour(m.name));
      segs.append(seg);
      const swatch = el("span", { class: `swatch ${h.kind}`, "aria-hidden": "true" });
      swatch.style.setProperty("--c", colour(m.name));
      legend.append(el("li", {}, swatch, el("span", { text: label })));
    }
    if (!parts.length) legend.append(el("li", { class: "muted", text: "no model holds memory" }));
    $("gpu-held").textContent = `${gib(total)} held`
      + (usable ? ` · ${gib(Math.max(0, usable - total))} free` : "");
    $("gpu-usable").textContent = usable ? `${gib(usable)} usable` : "usable size unknown";
    $("gpu-bar").setAttribute("aria-label", `GPU memory: ${gib(total)} held of `
      + `${usable ? gib(usable) : "unknown"} usable. ${parts.join("; ")}`);
    $("gpu-bar").classList.toggle("over", !!usable && total > usable + 1e-6);
    renderHost();
  }

  // Host RAM beside the GPU: the weights of models asleep at level 1 (host_gib each)
  function renderHost() {
    const usable = ui.info && ui.info.host ? ui.info.host.usable_gib : null;
    const held = ui.models.reduce((s, m) => s + (m.host_gib || 0), 0);
    const meter = $("host-meter");
    meter.max = usable || Math.max(held, 1);
    meter.value = held;
    $("host-held").textContent = `${gib(held)} held by level-1 sleepers`
      + (usable !== null ? ` of ${gib(usable)}` : "");
  }

  // ---------------------------------------------------------------- models table
  function actionButton(m, action) {
    const busy = ui.busy.has(m.name);
    const disabled = busy || m.external
      || (action === "load" && ["ready", "starting"].includes(m.state))
      || (action === "unload" && ["stopped", "stopping"].includes(m.state));
    const b = el("button", { type: "button", class: action === "load" ? "small" : "small secondary",
                             "aria-label": `${action === "load" ? "Load" : "Unload"} ${m.name}`,
                             disabled },
                 action === "load" ? "Load" : "Unload");
    b.addEventListener("click", () => act(m.name, action));
    return b;
  }

  function renderTable() {
    const body = $("models-body");
    // the rows are rebuilt on every poll: give keyboard focus back to the same button
    const focused = body.contains(document.activeElement)
      ? document.activeElement.getAttribute("aria-label") : null;
    body.replaceChildren();
    if (!ui.models.length) {
      body.append(el("tr", {}, el("td", { colspan: 9, class: "muted", text: "no models configured" })));
      return;
    }
    for (const m of ui.models) {
      const swatch = el("span", { class: "swatch ready", "aria-hidden": "true" });
      swatch.style.setProperty("--c", colour(m.name));
      const tags = [];
      if (m.aliases.length) tags.push(`aka ${m.aliases.join(", ")}`);
      if (m.pinned) tags.push("pinned");
      if (m.external) tags.push("external");
      if (m.node) tags.push(`on node ${m.node}`);
      if (m.restarts) tags.push(`${m.restarts} restart${m.restarts === 1 ? "" : "s"}`);
      if (m.replicas && m.replicas.length) {  // several engines: each replica's state
        tags.push(m.replicas.map((r) => `${r.replica} ${r.state} (${r.in_flight})`).join(", "));
      }
      const nameCell = el("th", { scope: "row" }, swatch, el("span", { class: "name", text: m.name }));
      if (tags.length) nameCell.append(el("div", { class: "muted small", text: tags.join(" · ") }));
      const state = m.draining && m.state === "ready" ? "draining" : m.state;
      const err = m.last_error || "";
      body.append(el("tr", { "data-model": m.name, "data-state": m.state },
        nameCell,
        el("td", {}, el("span", { class: `badge ${m.state}`, text: state })),
        el("td", { class: "phase", text: m.phase || "–" }),
        el("td", { class: "num", text: m.external ? "–" : gib(m.budget_gib) }),
        el("td", { class: "num", text: String(m.in_flight) }),
        el("td", { class: "num", text: String(m.queued) }),
        el("td", { class: "num", text: secs(m.last_load_s) }),
        el("td", { class: "err", title: err || null },
           el("span", { class: err ? "" : "muted", text: err || "–" })),
        el("td", { class: "actions" }, actionButton(m, "load"), actionButton(m, "unload"))));
    }
    const again = focused && [...body.querySelectorAll("button")]
      .find((x) => x.getAttribute("aria-label") === focused);
    if (again) again.focus();
  }

  function render() {
    renderGpu();
    renderTable();
  }

  async function act(name, action) {
    ui.busy.add(name);
    renderTable();
    const status = $("action-status");
    status.textContent = `${action === "load" ? "Loading" : "Unloading"} ${name}…`;
    setTimeout(poll, 100);
    try {
      const resp = await fetch(`/api/models/${encodeURIComponent(name)}/${action}`,
                               { method: "POST", headers: headers("admin") });
      if (!resp.ok) throw await errorOf(resp);
      const info = await resp.json();
      status.textContent = `${name} is ${info.state}`
        + (info.state === "failed" && info.last_error ? `: ${info.last_error}` : "");
    } catch (exc) {
      status.textContent = `${action} ${name} failed: ${oneLine(exc)}`;
    } finally {
      ui.busy.delete(name);
      poll();
    }
  }

  // ---------------------------------------------------------------- try it
  function fillModelSelect() {
    for (const fn of ui.listeners) fn(ui.info);
    const sel = $("try-model");
    const before = sel.value;
    sel.replaceChildren();
    for (const m of ui.info.models) {
      const caps = m.capabilities.length ? ` (${m.capabilities.join(", ")})` : "";
      sel.append(el("option", { value: m.name, text: m.name + caps }));
    }
    const ready = [...ui.models, ...ui.info.models].find((m) => m.state === "ready"
                                                         && infoOf(m.name));
    if (ui.picked && infoOf(before)) sel.value = before;
    else if (ready) sel.value = ready.name; // start with a model that answers at once
    fillPresets();
  }

  function fillPresets() {
    const m = infoOf($("try-model").value);
    const sel = $("try-preset");
    sel.replaceChildren();
    for (const name of Object.keys(m ? m.presets : {})) {
      sel.append(el("option", { value: name, text: name }));
    }
    sel.append(el("option", { value: "", text: "free prompt" }));
    sel.value = m && m.default_preset ? m.default_preset : sel.options[0].value;
    applyPreset();
  }

  function applyPreset() {
    const m = infoOf($("try-model").value);
    const p = m && $("try-preset").value ? m.presets[$("try-preset").value] : null;
    $("preset-desc").textContent = p ? p.description : "Write your own prompt.";
    if (p) {
      $("try-prompt").value = p.prompt;
      $("try-max").value = p.max_tokens || "";
    }
  }

  function readImage(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error || new Error("cannot read the file"));
      reader.readAsDataURL(file);
    });
  }

  async function onImage() {
    const file = $("try-image").files[0];
    if (!file) return clearImage();
    try {
      ui.image = await readImage(file);
      $("try-preview").src = ui.image;
      $("try-preview").hidden = false;
      $("try-clear-image").hidden = false;
    } catch (exc) {
      showError(new ApiError("image", `Cannot read ${file.name}: ${exc.message}`));
    }
  }

  function clearImage() {
    ui.image = null;
    $("try-image").value = "";
    $("try-preview").removeAttribute("src");
    $("try-preview").hidden = true;
    $("try-clear-image").hidden = true;
  }

  function showError(exc) {
    const box = $("try-error");
    box.replaceChildren();
    box.hidden = !exc;
    if (!exc) return;
    box.append(el("strong", { text: exc.headline ? `Error ${exc.headline}` : "Error" }),
               el("div", { class: "error-msg", text: exc.message }));
  }

  function requestBody() {
    const model = $("try-model").value;
    const m = infoOf(model);
    const p = m && $("try-preset").value ? m.presets[$("try-preset").value] : null;
    const text = $("try-prompt").value;
    const content = ui.image
      ? [{ type: "image_url", image_url: { url: ui.image } }, { type: "text", text }]
      : text;
    const body = { model, stream: true, messages: [{ role: "user", content }] };
    if (p && p.temperature !== null) body.temperature = p.temperature;
    if (p && p.top_p !== null) body.top_p = p.top_p;
    const max = parseInt($("try-max").value, 10);
    if (max > 0) body.max_tokens = max;
    return body;
  }

  // Parse one SSE event block; returns false at [DONE].
  function onEvent(block, out) {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:"))
      .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
    if (!data) return true;
    if (data.trim() === "[DONE]") return false;
    const obj = JSON.parse(data);
    if (obj.error) throw apiError("stream", obj.error, "the engine sent an error");
    for (const choice of obj.choices || []) {
      const piece = (choice.delta && choice.delta.content) || choice.text || "";
      if (piece) out.append(piece);
      if (choice.finish_reason) out.finish = choice.finish_reason;
    }
    return true;
  }

  // POST /v1/chat/completions with stream: true; out.append(piece) for each piece of text,
  // out.finish set from the finish reason, out.tick() after each read. Throws ApiError for an
  // error answer, an error event, or a stream that ends before its finish reason.
  async function streamChat(body, out, signal) {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers("api", true), body: JSON.stringify(body), signal,
    });
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let going = true;
    while (going) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const blocks = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : blocks.pop();
      for (const block of blocks) {
        if (!onEvent(block, out)) { going = false; break; }
      }
      if (out.tick) out.tick();
      if (done) break;
    }
    if (!going) reader.cancel().catch(() => {});
    if (!out.finish && going) {
      throw new ApiError("stream", "The stream ended before the answer was complete.");
    }
  }

  async function send(event) {
    event.preventDefault();
    if (ui.abort) return;
    showError(null);
    const outNode = $("try-out");
    outNode.textContent = "";
    const started = performance.now();
    let first = null;
    let chars = 0;
    const stats = () => {
      const t = ((performance.now() - started) / 1000).toFixed(1);
      const ttft = first === null ? "" : `, first token after ${(first / 1000).toFixed(1)} s`;
      $("try-stats").textContent = `${chars} characters in ${t} s${ttft}`
        + (out.finish ? `, finish: ${out.finish}` : "");
    };
    const out = {
      finish: null,
      append(piece) {
        if (first === null) first = performance.now() - started;
        chars += piece.length;
        outNode.append(piece);
        outNode.scrollTop = outNode.scrollHeight;
      },
      tick: stats,
    };
    ui.abort = new AbortController();
    $("try-send").disabled = true;
    $("try-stop").disabled = false;
    $("try-stats").textContent = "waiting (a model that is not loaded starts first)…";
    try {
      await streamChat(requestBody(), out, ui.abort.signal);
    } catch (exc) {
      if (exc.name === "AbortError") out.finish = "stopped by you";
      else showError(exc);
    } finally {
      stats();
      ui.abort = null;
      $("try-send").disabled = false;
      $("try-stop").disabled = true;
      poll();
    }
  }

  // What the other scripts of the page (ocr.js, panels.js) share.
  window.vlmhub = {
    el, gib, headers, errorOf, apiError, ApiError, oneLine, colour, infoOf, streamChat,
    info: () => ui.info,
    models: () => ui.models,
    onInfo(fn) { ui.listeners.push(fn); if (ui.info) fn(ui.info); },
  };

  // ---------------------------------------------------------------- wiring
  function init() {
    $("api-key").value = key("api");
    $("admin-key").value = key("admin");
    if (key("api") || key("admin")) $("keys").open = true;
    $("api-key").addEventListener("change", (e) => {
      setKey("api", e.target.value.trim());
      if (ui.info && ui.info.partial) ui.info = null;
    });
    $("admin-key").addEventListener("change", (e) => {
      setKey("admin", e.target.value.trim());
      ui.info = null;
      poll();
    });
    $("keys-clear").addEventListener("click", () => {
      setKey("api", "");
      setKey("admin", "");
      $("api-key").value = "";
      $("admin-key").value = "";
    });
    $("try-model").addEventListener("change", () => { ui.picked = true; fillPresets(); });
    $("try-preset").addEventListener("change", applyPreset);
    $("try-image").addEventListener("change", onImage);
    $("try-clear-image").addEventListener("click", clearImage);
    $("try-form").addEventListener("submit", send);
    $("try-stop").addEventListener("click", () => ui.abort && ui.abort.abort());
    poll();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
