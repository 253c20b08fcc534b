// pbrf-audit review page. Plain JavaScript, no build step, nothing loaded from elsewhere.
// Everything the server sends is shown with textContent / createElement, never parsed as HTML.
// The API key stays in this tab's sessionStorage and travels only in the Authorization header.
"use strict";

(() => {
  const KEY_STORAGE = "pbrf-audit.api-key";
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const FLAG_PAGE = 48;
  const POLL_MS = 2000;
  const MAX_INDICES = 100;       // GET /v1/datasets/{id}/examples: indices per request
  const MAX_VALUES = 1 << 20;    // ... and input values per answer
  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

  const $ = (id) => document.getElementById(id);

  // createElement with text children only (strings become text nodes, never markup)
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("data-") || name.startsWith("aria-") || name === "role") node.setAttribute(name, value);
      else node[name] = value;
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, type, detail) {
      super(detail);
      this.status = status;
      this.type = type;
    }
  }

  const apiKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

  async function api(path, { method = "GET", body, accept = "application/json" } = {}) {
    const headers = { Accept: accept };
    const key = apiKey();
    if (key) headers.Authorization = "Bearer " + key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
    if (!response.ok) {
      let type = "", detail = `${response.status} ${response.statusText}`;
      try {
        const problem = await response.json();
        type = String(problem.type || "");
        detail = String(problem.detail || detail);
      } catch (_) { /* not a problem document */ }
      throw new ApiError(response.status, type, detail);
    }
    return response;
  }

  async function getJson(path, options) {
    const response = await api(path, options);
    return response.status === 204 ? null : response.json();
  }

  // ------------------------------------------------------------------ messages

  function say(text, isError = false) {
    const box = $("message");
    box.textContent = text;
    box.classList.toggle("error", isError);
    box.hidden = !text;
  }

  function fail(error) {
    if (error instanceof ApiError && error.status === 401) {
      say(apiKey() ? "The API key was refused: " + error.message : "This server needs an API key: enter it above.", true);
      $("api-key").focus();
    } else {
      say(error instanceof ApiError ? `${error.message} (${error.status})` : String(error.message || error), true);
    }
  }

  // ------------------------------------------------------------------ state

  const state = {
    audits: [], models: new Map(), datasets: new Map(), pollTimer: null,
    audit: null, dataset: null, specs: null, flags: [], cursor: null, focus: -1,
    generation: 0, histogram: null, queue: Promise.resolve(), loadingMore: null,
  };

  // ------------------------------------------------------------------ API key

  function showKeyState() {
    $("key-state").textContent = apiKey() ? "key set for this tab" : "no key (open mode)";
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("api-key").value.trim();
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    showKeyState();
    say("");
    reloadAll();
  });

  $("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("api-key").value = "";
    showKeyState();
    closeReview();
    state.audits = [];
    renderAudits();
    reloadAll();
  });

  // ------------------------------------------------------------------ audits list

  const fmtPercent = (p) => `${Math.round((p || 0) * 100)}%`;
  const shortId = (id) => String(id).slice(0, 8);
  const datasetName = (id) => (state.datasets.get(id) || {}).name || `dataset ${shortId(id)}`;
  const modelName = (id) => (state.models.get(id) || {}).name || `model ${shortId(id)}`;

  async function loadNames() {
    const [models, datasets] = await Promise.all([getJson("/v1/models?limit=500"), getJson("/v1/datasets?limit=500")]);
    state.models = new Map(models.map((m) => [m.id, m]));
    state.datasets = new Map(datasets.map((d) => [d.id, d]));
  }

  async function loadAudits() {
    clearTimeout(state.pollTimer);
    const body = await getJson("/v1/audits?limit=100");
    state.audits = body.items;
    if (state.audits.some((a) => !state.datasets.has(a.dataset_id) || !state.models.has(a.model_id))) await loadNames();
    renderAudits();
    if (state.audit) {
      const fresh = state.audits.find((a) => a.id === state.audit.id);
      if (fresh && (fresh.status !== state.audit.status || fresh.progress !== state.audit.progress)) {
        const wasDone = state.audit.status === "succeeded";
        state.audit = fresh;
        if (!wasDone) openAudit(fresh.id);
      }
    }
    // live status: poll while anything is queued or running, stop once every audit has ended
    if (state.audits.some((a) => !TERMINAL.has(a.status))) {
      state.pollTimer = setTimeout(() => loadAudits().catch(fail), POLL_MS);
    }
  }

  function renderAudits() {
    const list = $("audits");
    list.replaceChildren();
    $("audits-empty").hidden = state.audits.length > 0;
    for (const audit of state.audits) {
      const bar = el("span");
      bar.style.width = fmtPercent(audit.progress);
      const item = el("li", { tabIndex: 0, "data-audit": audit.id, role: "button",
                              class: state.audit && state.audit.id === audit.id ? "selected" : "" },
        el("div", { class: "name", text: datasetName(audit.dataset_id) }),
        el("div", { class: "line" },
          el("span", { class: "muted", text: `${modelName(audit.model_id)} · ${audit.method}` }),
          el("span", { class: `status ${audit.status}`, text: audit.status })),
        el("div", { class: "line muted" },
          el("span", { text: audit.stage || "" }),
          el("span", { text: fmtPercent(audit.progress) })),
        el("div", { class: "bar" }, bar));
      item.title = `audit ${audit.id}`;
      item.addEventListener("click", () => selectAudit(audit.id));
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); selectAudit(audit.id); }
      });
      list.append(item);
    }
  }

  function selectAudit(id) {
    history.replaceState(null, "", "#audit=" + id);
    openAudit(id).catch(fail);
  }

  // ------------------------------------------------------------------ one audit

  function closeReview() {
    state.generation += 1;
    state.audit = null;
    $("review").hidden = true;
  }

  async function openAudit(id) {
    if (!UUID.test(id)) return;
    const generation = ++state.generation;
    const audit = await getJson(`/v1/audits/${encodeURIComponent(id)}`);
    if (generation !== state.generation) return;
    state.audit = audit;
    state.flags = []; state.cursor = null; state.focus = -1; state.dataset = null; state.specs = null;
    state.histogram = null;
    renderAudits();
    $("review").hidden = false;
    $("review-title").textContent = datasetName(audit.dataset_id);
    $("review-meta").textContent = `model ${modelName(audit.model_id)} · method ${audit.method} · audit ${audit.id}`;
    $("flags").replaceChildren();
    $("flags-more").hidden = true;
    $("drawing-rule").textContent = "";
    $("review-progress").textContent = "";
    const done = audit.status === "succeeded";
    for (const id of ["export-csv", "export-npz"]) $(id).disabled = false;
    document.querySelector(".review-top").hidden = !done;
    if (!done) {
      $("review-status").textContent = audit.status === "failed" ? `This audit failed: ${audit.error || "no detail"}`
        : audit.status === "cancelled" ? "This audit was cancelled: it has no flags."
        : `This audit is ${audit.status} (${audit.stage}, ${fmtPercent(audit.progress)}); its flags appear here when it succeeds.`;
      return;
    }
    const summary = audit.summary || {};
    $("review-status").textContent = summary.flag_rule ? `Flag rule: ${summary.flag_rule}` : "";
    const [dataset, histogram] = await Promise.all([
      getJson(`/v1/datasets/${encodeURIComponent(audit.dataset_id)}`),
      getJson(`/v1/audits/${encodeURIComponent(id)}/scores/histogram?bins=60`),
    ]);
    if (generation !== state.generation) return;
    state.dataset = dataset;
    state.histogram = histogram;
    $("review-title").textContent = dataset.name;
    drawHistogram();
    describeDrawing(dataset.inputs);
    await loadFlags(generation);
    if (state.flags.length) setFocus(0);
  }

  // ------------------------------------------------------------------ flags

  async function loadFlags(generation) {
    const cursor = state.cursor ? `&cursor=${encodeURIComponent(state.cursor)}` : "";
    const page = await getJson(`/v1/audits/${encodeURIComponent(state.audit.id)}/flags?limit=${FLAG_PAGE}${cursor}`);
    if (generation !== state.generation) return;
    const start = state.flags.length;
    state.flags.push(...page.items);
    state.cursor = page.next_cursor;
    $("flags-more").hidden = !state.cursor;
    const grid = $("flags");
    page.items.forEach((flag, k) => grid.append(flagCard(flag, start + k)));
    updateProgress();
    loadExamples(page.items, generation).catch(fail);
  }

  async function loadMore() {
    if (!state.cursor) return;
    if (!state.loadingMore) {
      state.loadingMore = loadFlags(state.generation).finally(() => { state.loadingMore = null; });
    }
    await state.loadingMore;
  }

  $("flags-more").addEventListener("click", () => loadMore().catch(fail));

  function suggestion(flag) {
    return flag.suggested_label !== null && flag.suggested_label !== undefined ? flag.suggested_label : flag.predicted_label;
  }

  function flagCard(flag, position) {
    const suggestedKind = flag.suggested_label !== null && flag.suggested_label !== undefined ? "suggested" : "predicted";
    const card = el("div", { class: "flag", tabIndex: -1, role: "option", "data-index": flag.index,
                             "data-position": position, "aria-selected": "false" },
      el("div", { class: "head" },
        el("span", { class: "rank", text: `#${flag.rank}` }),
        el("span", { class: "muted", text: `example ${flag.index}` })),
      el("div", { class: "example", "data-role": "example" }, el("span", { class: "muted", text: "loading…" })),
      el("div", { class: "labels", title: `given label → ${suggestedKind} label` },
        el("span", { class: "muted", text: "given" }),
        el("span", { class: "given", text: flag.given_label }),
        el("span", { class: "arrow", text: "→" }),
        el("span", { class: "muted", text: suggestedKind }),
        el("span", { class: "suggested", text: suggestion(flag) })),
      el("div", { class: "numbers" },
        el("span", { text: `score ${formatScore(flag.score)}`, title: `score ${flag.score}` }),
        el("span", { text: `p(given) ${formatNumber(flag.given_label_probability)}` })),
      el("span", { class: "verdict", "data-role": "verdict" }),
      el("div", { class: "actions" },
        actionButton("Accept", "a", position), actionButton("Keep", "k", position), actionButton("Unsure", "u", position)));
    card.addEventListener("click", () => setFocus(position));
    if (suggestion(flag) === flag.given_label) {
      const accept = card.querySelector(".actions button");
      accept.disabled = true;
      accept.title = "the model suggests the given label: keep it, or send another label with the API";
    }
    renderVerdict(card, flag);
    return card;
  }

  function actionButton(text, key, position) {
    const button = el("button", { type: "button", class: "secondary small", text, title: `${text} (key ${key})` });
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      setFocus(position);
      review(key);
    });
    return button;
  }

  const cardAt = (position) => $("flags").querySelector(`.flag[data-position="${position}"]`);

  function renderVerdict(card, flag) {
    const badge = card.querySelector('[data-role="verdict"]');
    card.classList.remove("v-mislabeled", "v-correct", "v-unsure");
    if (!flag.verdict) {
      badge.className = "verdict none";
      badge.textContent = "not reviewed";
      return;
    }
    card.classList.add("v-" + flag.verdict);
    badge.className = "verdict " + flag.verdict;
    badge.textContent = flag.verdict === "mislabeled" ? `mislabeled → ${flag.corrected_label}`
      : flag.verdict === "correct" ? "correct (label kept)" : "unsure";
    badge.title = flag.verdict_by ? `by ${flag.verdict_by}` : "";
  }

  function updateProgress() {
    const total = state.histogram ? state.histogram.num_flagged : state.flags.length;
    const reviewed = state.flags.filter((f) => f.verdict).length;
    $("review-progress").textContent = `Reviewed ${reviewed} of the ${state.flags.length} flags shown (${total} flagged in all).`;
  }

  function setFocus(position) {
    if (position < 0 || position >= state.flags.length) return;
    const old = cardAt(state.focus);
    if (old) { old.classList.remove("focused"); old.setAttribute("aria-selected", "false"); }
    state.focus = position;
    const card = cardAt(position);
    if (!card) return;
    card.classList.add("focused");
    card.setAttribute("aria-selected", "true");
    if (!card.contains(document.activeElement)) card.focus({ preventScroll: true });
    card.scrollIntoView({ block: "nearest" });
  }

  async function move(step) {
    const target = state.focus + step;
    if (target >= state.flags.length && state.cursor) await loadMore();
    setFocus(Math.min(Math.max(target, 0), state.flags.length - 1));
  }

  // a/k/u/x/0-9 on the focused flag; the requests run one after another, in the order of the keys
  function review(key) {
    const position = state.focus;
    const flag = state.flags[position];
    if (!flag || !state.audit) return;
    let request;
    if (/^[0-9]$/.test(key)) {
      const label = Number(key);
      if (label === flag.given_label) {
        say(`Example ${flag.index} already has label ${label}: press k to keep it.`, true);
        return;
      }
      request = { method: "PUT", body: { verdict: "mislabeled", corrected_label: label } };
    } else if (key === "a") {
      const label = suggestion(flag);
      if (label === flag.given_label) {
        say(`Example ${flag.index}: the model suggests its given label ${label}; press k to keep it (or send another label with the API).`, true);
        return;
      }
      request = { method: "PUT", body: { verdict: "mislabeled", corrected_label: label } };
    } else if (key === "k") request = { method: "PUT", body: { verdict: "correct" } };
    else if (key === "u") request = { method: "PUT", body: { verdict: "unsure" } };
    else if (key === "x") {
      if (!flag.verdict) return;
      request = { method: "DELETE" };
    }
    const path = `/v1/audits/${encodeURIComponent(state.audit.id)}/flags/${flag.index}/verdict`;
    const generation = state.generation;
    state.queue = state.queue.then(async () => {
      try {
        const answer = await getJson(path, request);
        if (generation !== state.generation) return;
        Object.assign(flag, answer || { verdict: null, corrected_label: null, verdict_by: null, verdict_at: null });
        const card = cardAt(position);
        if (card) renderVerdict(card, flag);
        updateProgress();
      } catch (error) { fail(error); }
    });
    if (key !== "x") move(1).catch(fail);
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    const target = event.target;
    if (target && target.closest && target.closest("input, textarea, select, [contenteditable]")) return;
    if ($("review").hidden || !state.flags.length) return;
    const key = event.key;
    if (key === "a" || key === "k" || key === "u" || key === "x" || /^[0-9]$/.test(key)) review(key);
    else if (key === "j" || key === "ArrowRight") move(1).catch(fail);
    else if (key === "ArrowLeft") move(-1).catch(fail);
    else return;
    event.preventDefault();
  });

  // ------------------------------------------------------------------ example inputs

  const isInteger = (dtype) => /^(u?int|bool)/.test(dtype);
  const product = (shape) => shape.reduce((a, b) => a * b, 1);

  // How an input is drawn (the rule the page states under the histogram):
  //  (C, H, W) with C = 1 or 3, and (H, W): an image (grayscale, or RGB from C = 3), C-ordered like torch;
  //  a flat vector whose length is a perfect square k*k with k >= 4 (digits' 64 features: 8 x 8) and whose
  //  values are not integer ids: a k x k grayscale image, read row by row;
  //  an integer vector: token ids, shown as tokens; anything else: its values.
  function drawing(spec) {
    const shape = spec.shape;
    if (shape.length === 3 && (shape[0] === 1 || shape[0] === 3) && shape[1] >= 2 && shape[2] >= 2) {
      return { kind: "image", channels: shape[0], height: shape[1], width: shape[2] };
    }
    if (shape.length === 2 && shape[0] >= 2 && shape[1] >= 2) return { kind: "image", channels: 1, height: shape[0], width: shape[1] };
    if (shape.length === 1 && isInteger(spec.dtype)) return { kind: "tokens" };
    if (shape.length === 1) {
      const side = Math.round(Math.sqrt(shape[0]));
      if (side >= 4 && side * side === shape[0]) return { kind: "image", channels: 1, height: side, width: side, square: true };
    }
    return { kind: "values" };
  }

  function describeDrawing(specs) {
    const parts = specs.map((spec) => {
      const how = drawing(spec);
      const what = `Input "${spec.name}" (${spec.dtype}, shape [${spec.shape.join(", ")}])`;
      if (how.kind === "image" && how.square) return `${what} is drawn as a ${how.height}×${how.width} image, read row by row`;
      if (how.kind === "image") return `${what} is drawn as ${how.channels === 3 ? "an RGB" : "a grayscale"} ${how.height}×${how.width} image`;
      if (how.kind === "tokens") return `${what} is shown as token ids`;
      return `${what} is shown as its values`;
    });
    const box = $("drawing-rule");
    box.replaceChildren(
      el("span", { text: `${parts.join("; ")}. ` }),
      el("details", {},
        el("summary", { text: "How inputs are drawn" }),
        el("span", { text: "(C, H, W) with C = 1 or 3, and (H, W), are images; a float vector of k×k values " +
          "(k ≥ 4, such as digits' 64 features) is a k×k image read row by row; an integer vector is token ids; " +
          "anything else shows its values. Each image is scaled from its own smallest value (black) to its " +
          "largest (white), so contrast is per example." })));
  }

  async function loadExamples(flags, generation) {
    const dataset = state.dataset;
    if (!dataset || !flags.length) return;
    const perExample = dataset.inputs.reduce((n, spec) => n + product(spec.shape), 0);
    if (perExample > MAX_VALUES) {
      for (const flag of flags) showExampleText(flag.index, `input too large to show (${perExample} values)`);
      return;
    }
    const chunk = Math.max(1, Math.min(MAX_INDICES, Math.floor(MAX_VALUES / Math.max(perExample, 1))));
    for (let start = 0; start < flags.length; start += chunk) {
      const indices = flags.slice(start, start + chunk).map((f) => f.index).join(",");
      const answer = await getJson(`/v1/datasets/${encodeURIComponent(dataset.id)}/examples?indices=${indices}`);
      if (generation !== state.generation) return;
      state.specs = answer.inputs;
      for (const example of answer.examples) {
        for (const card of $("flags").querySelectorAll(`.flag[data-index="${example.index}"]`)) {
          renderExample(card.querySelector('[data-role="example"]'), answer.inputs, example);
        }
      }
    }
  }

  function showExampleText(index, text) {
    for (const card of $("flags").querySelectorAll(`.flag[data-index="${index}"]`)) {
      card.querySelector('[data-role="example"]').replaceChildren(el("span", { class: "muted", text }));
    }
  }

  function renderExample(box, specs, example) {
    box.replaceChildren();
    for (const spec of specs) {
      const values = example.inputs[spec.name] || [];
      if (specs.length > 1) box.append(el("div", { class: "input-name", text: spec.name }));
      const how = drawing(spec);
      if (how.kind === "image") box.append(pixels(values, how, spec));
      else if (how.kind === "tokens") box.append(tokens(values));
      else box.append(featureValues(values));
    }
  }

  function pixels(values, how, spec) {
    const { channels, height, width } = how;
    const canvas = el("canvas", { class: "pixels", width, height });
    let low = Infinity, high = -Infinity;
    for (const v of values) { if (v < low) low = v; if (v > high) high = v; }
    const range = high > low ? high - low : 1;
    const context = canvas.getContext("2d");
    const image = context.createImageData(width, height);
    const plane = width * height;
    for (let p = 0; p < plane; p += 1) {
      for (let c = 0; c < 3; c += 1) {
        const v = values[(channels === 3 ? c * plane : 0) + p];
        image.data[4 * p + c] = Math.round(((v - low) / range) * 255);
      }
      image.data[4 * p + 3] = 255;
    }
    context.putImageData(image, 0, 0);
    const size = 96;
    canvas.style.width = `${width >= height ? size : Math.round((size * width) / height)}px`;
    canvas.style.height = `${height >= width ? size : Math.round((size * height) / width)}px`;
    canvas.title = `${spec.name}: ${height}×${width}${channels === 3 ? "×RGB" : ""}, values ${formatNumber(low)} … ${formatNumber(high)}`;
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", canvas.title);
    return canvas;
  }

  function tokens(values) {
    const box = el("div", { class: "tokens", title: `${values.length} token ids` });
    const shown = values.slice(0, 64);
    for (const id of shown) box.append(el("span", { text: id }));
    if (values.length > shown.length) box.append(el("span", { class: "muted", text: `+${values.length - shown.length}` }));
    return box;
  }

  function featureValues(values) {
    const shown = values.slice(0, 48).map(formatNumber).join(" ");
    const more = values.length > 48 ? ` … (${values.length} values)` : "";
    return el("div", { class: "features", text: shown + more, title: `${values.length} values` });
  }

  // scores near 1 (loo: 1 - p(given) without the example) keep their distance from 1 visible
  function formatScore(value) {
    if (typeof value === "number" && value > 0.999 && value < 1) return `1 − ${formatNumber(1 - value)}`;
    return formatNumber(value);
  }

  function formatNumber(value) {
    if (value === null || value === undefined) return "–";
    if (Number.isInteger(value)) return String(value);
    const magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(2);
    return String(Number(value.toPrecision(3)));
  }

  // ------------------------------------------------------------------ histogram

  function drawHistogram() {
    const data = state.histogram;
    const canvas = $("histogram");
    if (!data) return;
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth || 640, cssHeight = canvas.clientHeight || 180;
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, cssWidth, cssHeight);
    const left = 44, right = 12, top = 14, bottom = 30;
    const w = cssWidth - left - right, h = cssHeight - top - bottom;
    const counts = data.counts, edges = data.edges, bins = counts.length;
    const log = data.scale === "log";
    const position = (score) => {   // 0..1 along the x axis
      const a = log ? Math.log10(edges[0]) : edges[0], b = log ? Math.log10(edges[bins]) : edges[bins];
      const s = log ? Math.log10(score) : score;
      return b > a ? (s - a) / (b - a) : 0;
    };
    // counts on a log scale, so that the flagged tail's few examples stay visible beside the bulk
    const top10 = Math.log10(1 + Math.max(1, ...counts));
    const threshold = data.flagged_min_score;
    g.font = "11px system-ui, sans-serif";
    g.strokeStyle = "#dde1e8";
    g.fillStyle = "#667085";
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (const tick of [1, 10, 100, 1000, 10000, 100000, 1000000]) {
      const t = Math.log10(1 + tick) / top10;
      if (t > 1.001) break;
      const y = top + h - t * h;
      g.beginPath(); g.moveTo(left, y); g.lineTo(left + w, y); g.stroke();
      g.fillText(tick >= 1000 ? `${tick / 1000}k` : String(tick), left - 6, y);
    }
    for (let i = 0; i < bins; i += 1) {
      if (!counts[i]) continue;
      const barHeight = (Math.log10(1 + counts[i]) / top10) * h;
      const x = left + (i / bins) * w;
      const flagged = threshold !== null && edges[i + 1] > threshold;
      g.fillStyle = flagged ? "#c4321c" : "#2f5bd3";
      g.fillRect(x + 0.5, top + h - barHeight, Math.max(1, w / bins - 1), barHeight);
    }
    if (threshold !== null) {
      const x = left + Math.min(1, Math.max(0, position(threshold))) * w;
      g.strokeStyle = "#c4321c";
      g.setLineDash([4, 3]);
      g.beginPath(); g.moveTo(x, top - 4); g.lineTo(x, top + h); g.stroke();
      g.setLineDash([]);
      g.fillStyle = "#c4321c";
      g.textAlign = x > left + w - 90 ? "right" : "left";
      g.textBaseline = "top";
      g.fillText(` flagged ≥ ${formatNumber(threshold)}`, x, top - 12);
    }
    g.strokeStyle = "#667085";
    g.beginPath(); g.moveTo(left, top + h); g.lineTo(left + w, top + h); g.stroke();
    g.fillStyle = "#667085";
    g.textBaseline = "top";
    const ticks = 5;
    for (let k = 0; k <= ticks; k += 1) {
      const at = k / ticks;
      const a = log ? Math.log10(edges[0]) : edges[0], b = log ? Math.log10(edges[bins]) : edges[bins];
      const value = log ? 10 ** (a + at * (b - a)) : a + at * (b - a);
      g.textAlign = k === 0 ? "left" : k === ticks ? "right" : "center";
      g.fillText(formatNumber(value), left + at * w, top + h + 6);
    }
    $("histogram-caption").textContent =
      `Scores of all ${data.num_examples} examples (${data.scale} score axis, examples per bin on a log axis); ` +
      `${data.num_flagged} flagged, in red` + (data.excluded ? `; ${data.excluded} not shown (not finite${log ? " or not positive" : ""})` : "") + ".";
  }

  window.addEventListener("resize", () => { if (state.histogram) drawHistogram(); });

  // ------------------------------------------------------------------ export

  async function exportLabels(format) {
    const dataset = state.dataset || (state.audit && { id: state.audit.dataset_id });
    if (!dataset) return;
    const accept = format === "csv" ? "text/csv" : "application/octet-stream";
    const response = await api(`/v1/datasets/${encodeURIComponent(dataset.id)}/labels?corrected=true`, { accept });
    const blob = await response.blob();
    const changed = response.headers.get("X-Changed-Examples") || "0";
    const url = URL.createObjectURL(blob);
    const link = el("a", { href: url, download: `dataset-${dataset.id}-labels-corrected.${format}` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    say(`Exported the labels with ${changed} accepted correction${changed === "1" ? "" : "s"} applied (${format}).`);
  }

  $("export-csv").addEventListener("click", () => exportLabels("csv").catch(fail));
  $("export-npz").addEventListener("click", () => exportLabels("npz").catch(fail));

  // ------------------------------------------------------------------ start

  $("audits-refresh").addEventListener("click", () => reloadAll());

  async function reloadAll() {
    try {
      await loadNames();
      await loadAudits();
      const match = /^#audit=([0-9a-f-]{36})$/i.exec(location.hash);
      if (match && (!state.audit || state.audit.id !== match[1])) await openAudit(match[1]);
    } catch (error) { fail(error); }
  }

  showKeyState();
  reloadAll();
})();
