// Engine logs and the last hour: a tail of one engine's log (GET /api/ui/logs/{model},
// refreshed every 2 s while followed), and a chart of the GPU memory held per model with the
// loads and evictions over the last hour (GET /api/ui/history, every 5 s), drawn as SVG.
// Everything from the server is inserted as text or as SVG elements built one by one.
"use strict";

(() => {
  const V = window.vlmhub;
  const $ = (id) => document.getElementById(id);
  const LOG_MS = 2000;
  const HISTORY_MS = 5000;
  const ERROR_LINE = /\b(ERROR|CRITICAL|FATAL|Traceback|Exception|Error:)|out of memory/;
  const PHASE_LINE = /(Starting vLLM|Loading weights|Model loading took|Memory profiling|profiling|KV cache|Capturing CUDA graph|compil|Application startup complete|Sleep mode|Shutting down)/i;
  const EVENT_TEXT = { load: "loaded", load_failed: "failed to load", evict_stop: "evicted (stopped)",
                       evict_sleep: "evicted (put to sleep)" };
  const st = { logTimer: null, histTimer: null, picked: false, history: null };

  // ------------------------------------------------------------- logs
  function fillLogModels(info) {
    const sel = $("logs-model");
    const before = sel.value;
    sel.replaceChildren();
    for (const m of info.models.filter((x) => !x.external)) {
      sel.append(V.el("option", { value: m.name, text: m.name }));
    }
    const running = V.models().find((m) => ["ready", "starting", "failed"].includes(m.state));
    if (st.picked && [...sel.options].some((o) => o.value === before)) sel.value = before;
    else if (running) sel.value = running.name;
    refreshLogs();
  }

  async function refreshLogs() {
    clearTimeout(st.logTimer);
    const name = $("logs-model").value;
    const out = $("logs-out");
    if (name) {
      try {
        const q = new URLSearchParams({ tail: $("logs-tail").value });
        const resp = await fetch(`/api/ui/logs/${encodeURIComponent(name)}?${q}`,
                                 { headers: V.headers("admin"), cache: "no-store" });
        if (!resp.ok) throw await V.errorOf(resp);
        const data = await resp.json();
        const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
        out.replaceChildren();
        for (const line of data.lines) {
          const cls = ERROR_LINE.test(line) ? "err" : PHASE_LINE.test(line) ? "phase" : null;
          out.append(cls ? V.el("span", { class: cls, text: line }) : line, "\n");
        }
        if (!data.lines.length) out.append(V.el("span", { class: "muted", text: data.running ? "(no output yet)" : "(no log: the engine is not running)" }));
        out.dataset.lines = String(data.lines.length);
        if (atEnd) out.scrollTop = out.scrollHeight;
        $("logs-status").textContent = `${data.name}: ${data.state}${data.phase ? ` (${data.phase})` : ""}`
          + (data.error ? ` · cannot read the log: ${data.error}` : "");
      } catch (exc) {
        $("logs-status").textContent = `log not available: ${V.oneLine(exc)}`;
      }
    }
    if ($("logs-follow").checked && !document.hidden) st.logTimer = setTimeout(refreshLogs, LOG_MS);
  }

  // ------------------------------------------------------------- the last hour
  function svg(tag, attrs, text) {
    const node = document.createElementNS($("history-chart").namespaceURI, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const clock = (t) => new Date(t * 1000).toLocaleTimeString();

  function drawHistory(h) {
    const chart = $("history-chart");
    chart.replaceChildren();
    const W = 1000, H = 220, L = 58, R = 10, T = 12, B = 26;
    const span = Math.min(h.window_s, Number($("history-window").value) || h.window_s);
    const step = span <= 300 ? 1 : span <= 900 ? 3 : 10;  // minutes between ticks
    const t1 = h.now, t0 = h.now - span;
    const x = (t) => L + ((Math.max(t0, t) - t0) / (t1 - t0)) * (W - L - R);
    const info = V.info();
    const names = info ? info.models.map((m) => m.name) : [];
    for (const s of h.samples) for (const n of Object.keys(s.held_gib)) if (!names.includes(n)) names.push(n);
    const peak = Math.max(0, ...h.samples.map((s) => Object.values(s.held_gib).reduce((a, b) => a + b, 0)));
    const top = Math.max((info && info.gpu && info.gpu.usable_gib) || 0, peak, 1);
    const y = (g) => H - B - (g / top) * (H - T - B);
    chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
    chart.append(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "plot" }));
    for (let m = 0; m * 60 <= span; m += step) {  // time axis: minutes ago
      const tx = x(t1 - m * 60);
      chart.append(svg("line", { x1: tx, x2: tx, y1: T, y2: H - B, class: "grid" }),
                   svg("text", { x: tx, y: H - 8, class: "tick", "text-anchor": "middle" },
                       m ? `-${m} min` : "now"));
    }
    for (const g of [0, top / 2, top]) {
      chart.append(svg("text", { x: L - 6, y: y(g) + 4, class: "tick", "text-anchor": "end" },
                       `${g.toFixed(g < 10 ? 1 : 0)}${g === top ? " GiB" : ""}`));
    }
    // one stacked step area per model, in the table's order
    const base = h.samples.map(() => 0);
    for (const name of names) {
      const tops = h.samples.map((s, i) => base[i] + (s.held_gib[name] || 0));
      if (!tops.some((v, i) => v > base[i])) continue;
      let d = "";
      h.samples.forEach((s, i) => {
        const end = i + 1 < h.samples.length ? h.samples[i + 1].t : t1;
        d += `${d ? "L" : "M"}${x(s.t)},${y(tops[i])}L${x(end)},${y(tops[i])}`;
      });
      for (let i = h.samples.length - 1; i >= 0; i -= 1) {
        const end = i + 1 < h.samples.length ? h.samples[i + 1].t : t1;
        d += `L${x(end)},${y(base[i])}L${x(h.samples[i].t)},${y(base[i])}`;
      }
      const area = svg("path", { d: `${d}Z`, class: "area", fill: V.colour(name), "data-model": name });
      area.append(svg("title", {}, `${name}: GPU memory held`));
      chart.append(area);
      tops.forEach((v, i) => { base[i] = v; });
    }
    for (const e of h.events.filter((ev) => ev.t >= t0)) {  // ▲ load, ✕ failed, ▼ eviction
      const ex = x(e.t);
      const kind = e.kind.startsWith("evict") ? "evict" : e.kind;
      const shape = kind === "load" ? `M${ex - 5},${T + 10}L${ex + 5},${T + 10}L${ex},${T}Z`
        : kind === "evict" ? `M${ex - 5},${T + 12}L${ex + 5},${T + 12}L${ex},${T + 22}Z`
        : `M${ex - 4},${T}L${ex + 4},${T + 8}M${ex + 4},${T}L${ex - 4},${T + 8}`;
      const mark = svg("path", { d: shape, class: `ev ${e.kind}`, "data-model": e.model });
      const secs = e.seconds === null ? "" : ` in ${e.seconds.toFixed(1)} s`;
      mark.append(svg("title", {}, `${clock(e.t)} ${e.model} ${EVENT_TEXT[e.kind] || e.kind}${secs}`));
      chart.append(mark, svg("line", { x1: ex, x2: ex, y1: T + 10, y2: H - B, class: `ev-line ${kind}` }));
    }
    chart.dataset.samples = String(h.samples.length);
    chart.dataset.events = String(h.events.length);
    const legend = $("history-legend");
    legend.replaceChildren();
    for (const name of names) {
      const swatch = V.el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.setProperty("--c", V.colour(name));
      legend.append(V.el("li", {}, swatch, V.el("span", { text: name })));
    }
    const n = (k) => h.events.filter((e) => e.kind.startsWith(k)).length;
    $("history-summary").textContent = h.recording
      ? `last hour: ${n("load") - n("load_failed")} load(s), ${n("load_failed")} failed, `
        + `${n("evict")} eviction(s); memory held peaked at ${peak.toFixed(2)} GiB`
      : "This router keeps no history (it was not started by `vlmhub route`).";
    chart.setAttribute("aria-label", $("history-summary").textContent);
  }

  async function refreshHistory() {
    clearTimeout(st.histTimer);
    try {
      const resp = await fetch("/api/ui/history", { headers: V.headers("admin"), cache: "no-store" });
      if (!resp.ok) throw await V.errorOf(resp);
      st.history = await resp.json();
      drawHistory(st.history);
    } catch (exc) {
      $("history-summary").textContent = `history not available: ${V.oneLine(exc)}`;
    }
    st.histTimer = setTimeout(refreshHistory, HISTORY_MS);
  }

  function init() {
    V.onInfo(fillLogModels);
    $("logs-model").addEventListener("change", () => { st.picked = true; refreshLogs(); });
    $("logs-tail").addEventListener("change", refreshLogs);
    $("logs-follow").addEventListener("change", refreshLogs);
    $("history-window").addEventListener("change", () => st.history && drawHistory(st.history));
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshLogs(); });
    refreshHistory();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
