// The OCR playground: one page (an image, or a page of a PDF) through a model and a preset.
// The router prepares the page as `vlmhub ocr` would (POST /api/ui/ocr/page); the page then
// streams POST /v1/chat/completions itself with the preset's prompt and settings, and asks
// POST /api/ui/ocr/render for the Markdown and the repaired layout cells, whose boxes are
// drawn over the page. Server data is put in the page as text or as elements built one by
// one (a table's HTML goes through a whitelist), never as HTML.
"use strict";

(() => {
  const V = window.vlmhub;
  const $ = (id) => document.getElementById(id);
  const ALLOWED = new Set(["TABLE", "THEAD", "TBODY", "TFOOT", "TR", "TD", "TH", "CAPTION",
                           "B", "STRONG", "I", "EM", "SUB", "SUP", "BR", "P", "SPAN", "DIV",
                           "UL", "OL", "LI", "CODE"]);
  const st = { file: null, page: null, abort: null, result: null, urls: [], picked: false,
               colours: {} };

  // the colours of vlmhub.ocr.drawing (`vlmhub ocr --draw-layout`), sent with the layout
  const catColour = (c) => st.colours[c] || st.colours.other || "#495057";

  // ------------------------------------------------------------- safe Markdown rendering
  // Only whitelisted elements (and colspan/rowspan) of an HTML fragment, rebuilt as new
  // elements; everything else is reduced to its text. DOMParser's document is inert.
  function safeHtml(html) {
    const doc = new DOMParser().parseFromString(html, "text/html");
    const frag = document.createDocumentFragment();
    const copy = (node, into) => {
      for (const child of node.childNodes) {
        if (child.nodeType === Node.TEXT_NODE) {
          into.append(document.createTextNode(child.textContent));
        } else if (child.nodeType === Node.ELEMENT_NODE) {
          if (ALLOWED.has(child.tagName)) {
            const made = document.createElement(child.tagName.toLowerCase());
            for (const attr of ["colspan", "rowspan"]) {
              const v = child.getAttribute(attr);
              if (v && /^\d{1,3}$/.test(v)) made.setAttribute(attr, v);
            }
            copy(child, made);
            into.append(made);
          } else {
            copy(child, into);
          }
        }
      }
    };
    copy(doc.body, frag);
    return frag;
  }

  // **bold**, *italic*, `code`, $math$ (shown as its LaTeX source), and plain text.
  function inline(text, into) {
    const parts = text.split(/(\*\*[^*]+\*\*|`[^`]+`|\$[^$\n]+\$|\*[^*\s][^*]*\*|<br\s*\/?>)/);
    for (const p of parts) {
      if (!p) continue;
      if (/^<br/.test(p)) into.append(document.createElement("br"));
      else if (p.startsWith("**")) into.append(V.el("strong", { text: p.slice(2, -2) }));
      else if (p.startsWith("`")) into.append(V.el("code", { text: p.slice(1, -1) }));
      else if (p.startsWith("$")) into.append(V.el("code", { class: "math", text: p }));
      else if (p.startsWith("*")) into.append(V.el("em", { text: p.slice(1, -1) }));
      else into.append(document.createTextNode(p));
    }
  }

  function renderMarkdown(md, target) {
    target.replaceChildren();
    const lines = md.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    const until = (stop) => {
      const body = [];
      while (i < lines.length && !stop(lines[i])) body.push(lines[i++]);
      return body;
    };
    while (i < lines.length) {
      const line = lines[i];
      const trimmed = line.trim();
      if (!trimmed) { i += 1; continue; }
      if (trimmed.startsWith("```")) {
        i += 1;
        const body = until((l) => l.trim().startsWith("```"));
        i += 1;
        target.append(V.el("pre", { class: "code", text: body.join("\n") }));
      } else if (trimmed.startsWith("$$")) {
        let body;
        if (trimmed.length > 4 && trimmed.endsWith("$$")) { body = [trimmed]; i += 1; } else {
          i += 1;
          body = ["$$", ...until((l) => l.trim().startsWith("$$")), "$$"];
          i += 1;
        }
        target.append(V.el("pre", { class: "formula", title: "LaTeX", text: body.join("\n") }));
      } else if (trimmed.startsWith("<!--")) {  // a comment: vlmhub's "recovered" note
        const body = [];
        while (i < lines.length) {
          body.push(lines[i]);
          i += 1;
          if (body[body.length - 1].includes("-->")) break;
        }
        const note = body.join(" ").replace(/<!--|-->/g, "").trim();
        target.append(V.el("p", { class: "note", role: "note", text: note }));
      } else if (/^<[a-z]/i.test(trimmed)) {
        const body = until((l) => !l.trim());
        target.append(V.el("div", { class: "html" }, safeHtml(body.join("\n"))));
      } else if (/^#{1,6}\s/.test(trimmed)) {
        const level = trimmed.match(/^#+/)[0].length;
        const h = document.createElement(`h${Math.min(6, level + 2)}`);
        inline(trimmed.replace(/^#+\s+/, ""), h);
        target.append(h);
        i += 1;
      } else if (/^!\[[^\]]*\]\([^)]*\)$/.test(trimmed)) {
        const [, alt, src] = trimmed.match(/^!\[([^\]]*)\]\(([^)]*)\)$/);
        target.append(V.el("p", { class: "pic", text: `[${alt || "picture"}: ${src}]` }));
        i += 1;
      } else if (/^([-*+]|\d+[.)])\s/.test(trimmed)) {
        const ordered = /^\d/.test(trimmed);
        const list = document.createElement(ordered ? "ol" : "ul");
        while (i < lines.length && /^\s*([-*+]|\d+[.)])\s/.test(lines[i])) {
          const li = document.createElement("li");
          inline(lines[i].trim().replace(/^([-*+]|\d+[.)])\s+/, ""), li);
          list.append(li);
          i += 1;
        }
        target.append(list);
      } else {
        const body = until((l) => !l.trim() || /^(#{1,6}\s|\$\$|```|<[a-z!])/i.test(l.trim()));
        const p = document.createElement("p");
        inline(body.join(" "), p);
        target.append(p);
      }
    }
  }

  // ------------------------------------------------------------- page and boxes
  function showError(exc) {
    const box = $("ocr-error");
    box.replaceChildren();
    box.hidden = !exc;
    if (exc) {
      box.append(V.el("strong", { text: exc.headline ? `Error ${exc.headline}` : "Error" }),
                 V.el("div", { class: "error-msg", text: exc.message }));
    }
  }

  function status(text, state) {
    $("ocr-status").textContent = text;
    if (state) $("ocr").dataset.state = state;
  }

  function clearBoxes() {
    $("ocr-boxes").replaceChildren();
    $("ocr-legend").replaceChildren();
    $("ocr-hover").textContent = "Hover a box to see its text.";
  }

  function showCell(cell) {
    const hover = $("ocr-hover");
    hover.replaceChildren(V.el("strong", { text: `${cell.category}${cell.partial ? " (cut short)" : ""}: ` }),
                          V.el("span", { text: cell.text || "(no text)" }));
  }

  function drawBoxes(layout) {
    clearBoxes();
    st.colours = layout.colours || {};
    const svg = $("ocr-boxes");
    // the boxes are in the original page's pixels (as NAME.json of `vlmhub ocr`)
    svg.setAttribute("viewBox", `0 0 ${layout.width} ${layout.height}`);
    const counts = new Map();
    layout.cells.forEach((cell, index) => {
      if (!cell.bbox) return;
      const [x1, y1, x2, y2] = cell.bbox;
      const rect = document.createElementNS($("ocr-boxes").namespaceURI, "rect");
      const c = catColour(cell.category);
      for (const [k, v] of Object.entries({ x: x1, y: y1, width: Math.max(1, x2 - x1),
                                             height: Math.max(1, y2 - y1), fill: c,
                                             stroke: c, tabindex: 0, "data-index": index,
                                             "data-category": cell.category })) {
        rect.setAttribute(k, String(v));
      }
      rect.setAttribute("class", `box${cell.partial ? " partial" : ""}`);
      const title = document.createElementNS($("ocr-boxes").namespaceURI, "title");
      title.textContent = `${cell.category}: ${(cell.text || "").slice(0, 400)}`;
      rect.append(title);
      for (const ev of ["mouseenter", "focus"]) rect.addEventListener(ev, () => showCell(cell));
      svg.append(rect);
      counts.set(cell.category, (counts.get(cell.category) || 0) + 1);
    });
    for (const [cat, n] of counts) {
      const swatch = V.el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.setProperty("--c", catColour(cat));
      $("ocr-legend").append(V.el("li", {}, swatch, V.el("span", { text: `${cat} (${n})` })));
    }
  }

  function showPage(info) {
    st.page = info;
    const img = $("ocr-image");
    img.src = info.data_url;
    img.hidden = false;
    $("ocr-boxes").setAttribute("viewBox", `0 0 ${info.width} ${info.height}`);
    clearBoxes();
    const scaled = info.width !== info.source_width ? ` (from ${info.source_width}×${info.source_height})` : "";
    status(`page ${info.page} of ${info.pages}: ${info.width}×${info.height} px${scaled}`
           + (info.dpi ? ` at ${info.dpi} dpi` : ""), "ready");
    $("ocr-run").disabled = false;
  }

  function readLocally(file) {  // without Pillow on the router: an image as it is
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onerror = () => reject(reader.error || new Error("cannot read the file"));
      reader.onload = () => {
        const img = new Image();
        img.onload = () => resolve({ data_url: reader.result, width: img.naturalWidth,
                                     height: img.naturalHeight, source_width: img.naturalWidth,
                                     source_height: img.naturalHeight, page: 1, pages: 1,
                                     dpi: null });
        img.onerror = () => reject(new Error("not an image the browser can read"));
        img.src = reader.result;
      };
      reader.readAsDataURL(file);
    });
  }

  async function loadPage() {
    const file = $("ocr-file").files[0];
    st.file = file || null;
    showError(null);
    $("ocr-run").disabled = true;
    if (!file) return;
    status(`preparing ${file.name}…`, "preparing");
    const page = Math.max(1, parseInt($("ocr-page").value, 10) || 1);
    const q = new URLSearchParams({ model: $("ocr-model").value, name: file.name, page });
    try {
      const resp = await fetch(`/api/ui/ocr/page?${q}`, {
        method: "POST", headers: { ...V.headers("admin"), "Content-Type": "application/octet-stream" },
        body: file,
      });
      if (resp.status === 501 && !/\.pdf$/i.test(file.name)) showPage(await readLocally(file));
      else if (!resp.ok) throw await V.errorOf(resp);
      else showPage(await resp.json());
      $("ocr-page").max = String(st.page.pages);
    } catch (exc) {
      status("", "error");
      showError(exc instanceof V.ApiError ? exc : new V.ApiError("file", exc.message));
    }
  }

  // ------------------------------------------------------------- run
  function preset() {
    const m = V.infoOf($("ocr-model").value);
    const name = $("ocr-preset").value;
    return m && name ? { name, ...m.presets[name] } : null;
  }

  function requestBody(p) {
    const body = {
      model: $("ocr-model").value, stream: true,
      messages: [{ role: "user", content: [
        { type: "image_url", image_url: { url: st.page.data_url } },
        { type: "text", text: p ? p.prompt : "Extract all text from this image." },
      ] }],
    };
    for (const k of ["temperature", "top_p", "max_tokens"]) {
      if (p && p[k] !== null && p[k] !== undefined) body[k] = p[k];
    }
    return body;
  }

  function download(id, name, text, type) {
    const a = $(id);
    const url = URL.createObjectURL(new Blob([text], { type }));
    st.urls.push(url);
    a.href = url;
    a.download = name;
    a.hidden = false;
  }

  async function render(raw, p, finish) {
    const resp = await fetch("/api/ui/ocr/render", {
      method: "POST", headers: V.headers("admin", true),
      body: JSON.stringify({ model: $("ocr-model").value, preset: p ? p.name : null, text: raw,
                             width: st.page.width, height: st.page.height,
                             source_width: st.page.source_width,
                             source_height: st.page.source_height }),
    });
    const out = resp.ok ? await resp.json() : { markdown: raw, layout: null, recovered: false };
    renderMarkdown(out.markdown, $("ocr-md"));
    if (out.layout) drawBoxes(out.layout);
    const base = (st.file ? st.file.name.replace(/\.[^.]+$/, "") : "page")
      + (st.page.pages > 1 ? `-p${String(st.page.page).padStart(4, "0")}` : "");
    download("ocr-md-dl", `${base}.md`, out.markdown, "text/markdown");
    download("ocr-json-dl", `${base}.json`, JSON.stringify({
      model: $("ocr-model").value, preset: p ? p.name : null, file: st.file ? st.file.name : null,
      page: st.page.page, width: st.page.width, height: st.page.height,
      source_width: st.page.source_width, source_height: st.page.source_height,
      finish_reason: finish, recovered: out.recovered, not_recovered: !!out.not_recovered,
      notes: out.layout ? out.layout.notes : [], cells: out.layout ? out.layout.cells : [],
      raw,
    }, null, 2), "application/json");
    const n = out.layout ? out.layout.cells.length : 0;
    status(`done: ${n ? `${n} cell(s)` : `${raw.length} characters`}, finish: ${finish}`
           + (out.recovered ? " · recovered (see the note at the end)" : "")
           + (out.not_recovered ? " · not layout JSON: nothing could be read (see the raw answer)" : "")
           + (resp.ok ? "" : " · boxes need the admin key"), "done");
  }

  async function run(event) {
    event.preventDefault();
    if (st.abort || !st.page) return;
    showError(null);
    clearBoxes();
    for (const url of st.urls.splice(0)) URL.revokeObjectURL(url);
    $("ocr-md-dl").hidden = $("ocr-json-dl").hidden = true;
    $("ocr-md").replaceChildren();
    const rawNode = $("ocr-raw-out");
    rawNode.textContent = "";
    const p = preset();
    const t0 = performance.now();
    let chars = 0;
    const out = {
      finish: null,
      append(piece) { chars += piece.length; rawNode.append(piece); },
      tick() { status(`${chars} characters in ${((performance.now() - t0) / 1000).toFixed(1)} s…`); },
    };
    st.abort = new AbortController();
    $("ocr-run").disabled = true;
    $("ocr-stop").disabled = false;
    status("waiting for the model (one that is not loaded starts first)…", "running");
    try {
      await V.streamChat(requestBody(p), out, st.abort.signal);
      await render(rawNode.textContent, p, out.finish);
    } catch (exc) {
      status(exc.name === "AbortError" ? "stopped" : "", exc.name === "AbortError" ? "ready" : "error");
      if (exc.name !== "AbortError") showError(exc);
    } finally {
      st.abort = null;
      $("ocr-run").disabled = false;
      $("ocr-stop").disabled = true;
    }
  }

  // ------------------------------------------------------------- selects
  function fillModels(info) {
    const sel = $("ocr-model");
    const before = sel.value;
    sel.replaceChildren();
    const models = info.models.filter((m) => !m.capabilities.length
                                       || m.capabilities.includes("vision"));
    for (const m of models) sel.append(V.el("option", { value: m.name, text: m.name }));
    const ocr = models.find((m) => m.capabilities.includes("ocr"));
    if (st.picked && models.some((m) => m.name === before)) sel.value = before;
    else if (ocr) sel.value = ocr.name;
    fillPresets();
  }

  function fillPresets() {
    const m = V.infoOf($("ocr-model").value);
    const sel = $("ocr-preset");
    sel.replaceChildren();
    for (const [name, p] of Object.entries(m ? m.presets : {})) {
      sel.append(V.el("option", { value: name, text: p.description ? `${name}: ${p.description}` : name }));
    }
    if (!sel.options.length) sel.append(V.el("option", { value: "", text: "generic prompt" }));
    if (m && m.default_preset) sel.value = m.default_preset;
  }

  function init() {
    V.onInfo(fillModels);
    $("ocr-model").addEventListener("change", () => {
      st.picked = true;
      fillPresets();
      if (st.file) loadPage();  // another model may have another pixel cap
    });
    $("ocr-file").addEventListener("change", loadPage);
    $("ocr-page").addEventListener("change", loadPage);
    $("ocr-form").addEventListener("submit", run);
    $("ocr-stop").addEventListener("click", () => st.abort && st.abort.abort());
    $("ocr-raw").addEventListener("change", (e) => { $("ocr-raw-out").hidden = !e.target.checked; });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
