// Steering lab: build a request (features, saved vectors, sampling), stream default and steered
// text side by side from POST /api/v1/steer/stream (fetch: EventSource cannot POST), stop it,
// save it as a run, and sweep one feature's strength. Model and user text go in as textContent.

import { plotText, withPlotly } from "./plots.js";
import { fmtNum, onSubmitOrCtrlEnter, postJSON } from "./tokens.js";

const root = document.querySelector("[data-steer-lab]");
const api = root.dataset.api;
const saesApi = root.dataset.saesApi;
const maxFeatures = Number(root.dataset.maxFeatures);
const maxVectors = Number(root.dataset.maxVectors);
const saes = JSON.parse(document.getElementById("steer-saes").textContent);
const prefill = JSON.parse(document.getElementById("steer-prefill").textContent);
const $ = (id) => document.getElementById(id);

const form = $("steer-form");
const saeSelect = $("steer-sae");
const prompt = $("steer-prompt");
const featureBody = $("steer-features").tBodies[0];
const vectorTable = $("steer-vectors");
const status = $("steer-status");
const goButton = $("steer-go");
const stopButton = $("steer-stop");
const outputs = { default: $("steer-default"), steered: $("steer-steered") };
const metas = { default: $("steer-default-meta"), steered: $("steer-steered-meta") };

let features = []; // {index, mode, value, sae_id, label, maxAct, units}
let vectors = []; // {name, hook_name, value}
let lastRequest = null;
let controller = null;

const saeById = Object.fromEntries(saes.map((s) => [s.id, s]));
const featureUrl = (saeId, index) => `/${encodeURIComponent(saeById[saeId]?.model_id ?? "")}/${encodeURIComponent(saeId)}/${index}`;

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

// --- features ------------------------------------------------------------------------------

async function describeFeature(feature) {
  try {
    const res = await fetch(`${saesApi}/${encodeURIComponent(feature.sae_id)}/features/${feature.index}`);
    if (!res.ok) return;
    const data = await res.json();
    feature.label = data.label?.description || "";
    feature.maxAct = data.maxActApprox || null;
  } catch {
    // The label is a convenience; steering works without it.
  }
}

function addFeature(spec) {
  if (features.length >= maxFeatures) {
    status.textContent = `at most ${maxFeatures} features`;
    return;
  }
  const feature = {
    index: Number(spec.index), mode: spec.mode || "add", value: Number(spec.value ?? 0),
    sae_id: spec.sae_id || saeSelect.value, label: "", maxAct: null, units: "act",
  };
  features.push(feature);
  renderFeatures();
  describeFeature(feature).then(renderFeatures);
}

function renderFeatures() {
  featureBody.replaceChildren(...features.map((f, i) => {
    const link = el("a", { href: featureUrl(f.sae_id, f.index), textContent: `${f.sae_id} #${f.index}` });
    const mode = el("select", { ariaLabel: "mode" }, ...["add", "clamp", "multiply", "ablate"].map(
      (m) => el("option", { value: m, textContent: m, selected: m === f.mode })));
    mode.addEventListener("change", () => { f.mode = mode.value; renderFeatures(); });
    const value = el("input", { type: "number", step: "any", value: String(f.value), ariaLabel: "value",
                                disabled: f.mode === "ablate" });
    value.dataset.featureValue = String(i);
    value.addEventListener("input", () => { f.value = Number(value.value); });
    const units = el("select", { ariaLabel: "units", disabled: !f.maxAct || f.mode === "multiply" || f.mode === "ablate" },
      el("option", { value: "act", textContent: "activation", selected: f.units === "act" }),
      el("option", { value: "max", textContent: f.maxAct ? `× max act (${fmtNum(f.maxAct)})` : "× max act",
                     selected: f.units === "max" }));
    units.addEventListener("change", () => { f.units = units.value; });
    const remove = el("button", { type: "button", className: "btn subtle", textContent: "remove" });
    remove.addEventListener("click", () => { features.splice(i, 1); renderFeatures(); });
    return el("tr", {}, el("td", {}, link), el("td", { className: "label-cell" },
      el("span", { className: f.label ? "label" : "label unlabeled", textContent: f.label || "unlabeled" })),
      el("td", {}, mode), el("td", { className: "num" }, value), el("td", {}, units), el("td", {}, remove));
  }));
}

function featurePayload(f) {
  const scale = f.units === "max" && f.maxAct && (f.mode === "add" || f.mode === "clamp") ? f.maxAct : 1;
  const out = { index: f.index, mode: f.mode, value: f.mode === "ablate" ? 0 : f.value * scale };
  if (f.sae_id !== saeSelect.value) out.sae_id = f.sae_id;
  return out;
}

// Find features by label text (the feature table's q filter) or by index.
const find = $("steer-find");
const found = $("steer-found");
let findTimer = null;
find.addEventListener("input", () => {
  clearTimeout(findTimer);
  findTimer = setTimeout(searchFeatures, 200);
});
async function searchFeatures() {
  const q = find.value.trim();
  found.replaceChildren();
  if (!q || /^\d+$/.test(q)) return;
  const res = await fetch(`${saesApi}/${encodeURIComponent(saeSelect.value)}/features?q=${encodeURIComponent(q)}&per_page=8`);
  if (!res.ok) return;
  for (const row of (await res.json()).data) {
    const pick = el("button", { type: "button", className: "btn", textContent: `#${row.index} ${row.label?.description ?? ""}` });
    pick.addEventListener("click", () => { addFeature({ index: row.index }); found.replaceChildren(); find.value = ""; });
    found.append(el("li", {}, pick));
  }
}
$("steer-add-feature").addEventListener("click", () => {
  const q = find.value.trim();
  if (/^\d+$/.test(q)) { addFeature({ index: Number(q) }); find.value = ""; }
  else status.textContent = "type a feature index, or pick one from the matches";
});

// --- saved vectors -------------------------------------------------------------------------

const vectorPick = $("steer-vector-pick");
async function loadVectors() {
  vectorPick.replaceChildren(el("option", { value: "", textContent: "saved vector…" }));
  const res = await fetch(`${api}/vectors?sae_id=${encodeURIComponent(saeSelect.value)}`);
  if (!res.ok) return;
  for (const v of (await res.json()).data) {
    vectorPick.append(el("option", { value: v.name, textContent: `${v.name} (${v.hook_name})` }));
  }
}
$("steer-add-vector").addEventListener("click", () => {
  if (!vectorPick.value) return;
  if (vectors.length >= maxVectors) {
    status.textContent = `at most ${maxVectors} vectors`;
    return;
  }
  vectors.push({ name: vectorPick.value, value: 1 });
  renderVectors();
});
function renderVectors() {
  vectorTable.hidden = vectors.length === 0;
  vectorTable.tBodies[0].replaceChildren(...vectors.map((v, i) => {
    const value = el("input", { type: "number", step: "any", value: String(v.value), ariaLabel: "vector value" });
    value.addEventListener("input", () => { v.value = Number(value.value); });
    const remove = el("button", { type: "button", className: "btn subtle", textContent: "remove" });
    remove.addEventListener("click", () => { vectors.splice(i, 1); renderVectors(); });
    return el("tr", {}, el("td", { textContent: v.name }), el("td", { textContent: "at its hook" }),
      el("td", { className: "num" }, value), el("td", {}, remove));
  }));
}

// --- the request ---------------------------------------------------------------------------

function buildRequest() {
  return {
    sae_id: saeSelect.value,
    prompt: prompt.value,
    features: features.map(featurePayload),
    vectors: vectors.map((v) => ({ name: v.name, value: v.value })),
    scope: $("steer-scope").value,
    temperature: Number($("steer-temperature").value),
    top_p: Number($("steer-top-p").value),
    max_new_tokens: Number($("steer-max-new").value),
    seed: Number($("steer-seed").value),
    chat_template: $("steer-chat").checked,
  };
}

function applyPrefill(req) {
  if (req.sae_id && saeById[req.sae_id]) saeSelect.value = req.sae_id;
  if (req.prompt) prompt.value = req.prompt;
  for (const [id, key] of [["steer-scope", "scope"], ["steer-temperature", "temperature"],
    ["steer-top-p", "top_p"], ["steer-max-new", "max_new_tokens"], ["steer-seed", "seed"]]) {
    if (req[key] !== undefined && req[key] !== null) $(id).value = String(req[key]);
  }
  $("steer-chat").checked = Boolean(req.chat_template);
  for (const f of req.features || []) addFeature({ ...f, sae_id: f.sae_id || saeSelect.value });
  vectors = (req.vectors || []).map((v) => ({ name: v.name, value: v.value }));
  renderVectors();
}

function onSaeChange() {
  $("steer-chat-wrap").hidden = !saeById[saeSelect.value]?.chat;
  loadVectors();
  loadRuns();
}
saeSelect.addEventListener("change", onSaeChange);

// --- streaming -----------------------------------------------------------------------------

/** Split server-sent events off the front of `buffer`: [events, rest]. */
function takeEvents(buffer) {
  const events = [];
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  for (const block of blocks) {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (data.length) events.push({ event, data: JSON.parse(data.join("\n")) });
  }
  return [events, rest];
}

function setRunning(running) {
  goButton.disabled = running;
  stopButton.disabled = !running;
  root.dataset.state = running ? "streaming" : "idle";
}

async function generate() {
  const request = buildRequest();
  for (const which of ["default", "steered"]) {
    outputs[which].replaceChildren();
    metas[which].textContent = "";
  }
  $("steer-save-card").hidden = true;
  $("steer-run-link").hidden = true;
  controller = new AbortController();
  setRunning(true);
  status.textContent = "generating…";
  let finished = false;
  try {
    const res = await fetch(`${api}/stream`, {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(request),
    });
    if (!res.ok) {
      let message = `request failed (${res.status})`;
      try { message = (await res.json()).error.message; } catch { /* not JSON */ }
      const retry = res.headers.get("Retry-After");
      throw new Error(retry ? `${message} (retry in ${retry}s)` : message);
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let events;
      [events, buffer] = takeEvents(buffer + value);
      for (const { event, data } of events) {
        if (event === "token") {
          outputs[data.which].append(data.text);
        } else if (event === "error") {
          throw new Error(data.message);
        } else if (event === "done") {
          finished = true;
          for (const which of ["default", "steered"]) {
            metas[which].textContent = `${data[which].tokens} tokens · ${data[which].stop_reason.replace(/_/g, " ")}`;
          }
        }
      }
    }
    status.textContent = finished ? "done" : "the stream ended early";
    root.dataset.state = finished ? "done" : "idle";
  } catch (err) {
    status.textContent = err.name === "AbortError" ? "stopped" : err.message;
  } finally {
    setRunning(false);
    if (finished) root.dataset.state = "done";
    controller = null;
  }
  if (finished) {
    lastRequest = request;
    $("steer-save-card").hidden = false;
  }
}

onSubmitOrCtrlEnter(form, prompt, generate);
stopButton.addEventListener("click", () => controller?.abort());

// --- saved runs ----------------------------------------------------------------------------

$("steer-save").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const link = $("steer-run-link");
  try {
    const run = await postJSON(`${api}/runs`, {
      name: $("steer-run-name").value, request: lastRequest,
      default_text: outputs.default.textContent, steered_text: outputs.steered.textContent,
    });
    link.href = `/steer/runs/${run.id}`;
    link.textContent = `saved: /steer/runs/${run.id}`;
    link.hidden = false;
    loadRuns();
  } catch (err) {
    status.textContent = err.message;
  }
});

async function loadRuns() {
  const list = $("steer-runs");
  const res = await fetch(`${api}/runs?sae_id=${encodeURIComponent(saeSelect.value)}`);
  if (!res.ok) return;
  const runs = (await res.json()).data;
  // Only a run's author may delete it (app/store/steering.py; no role overrides that, admins
  // included): others, such as the local admin before the demo's runs, get no delete button.
  const me = document.body.dataset.user;
  list.replaceChildren(...runs.map((run) => {
    const item = el("li", {}, el("a", { href: `/steer/runs/${run.id}`, textContent: run.name }),
      el("span", { className: "muted small", textContent: ` · ${run.author}` }));
    if (run.author !== me) return item;
    const remove = el("button", { type: "button", className: "btn subtle", textContent: "delete" });
    remove.dataset.deleteRun = String(run.id);
    remove.addEventListener("click", async () => {
      const del = await fetch(`${api}/runs/${run.id}`, { method: "DELETE" });
      if (del.ok) loadRuns();
      else status.textContent = (await del.json()).error.message;
    });
    item.append(remove);
    return item;
  }));
  if (!runs.length) list.append(el("li", { className: "muted", textContent: "none yet" }));
}

// --- new steering vector -------------------------------------------------------------------

$("steer-vector-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const vectorStatus = $("steer-vector-status");
  const lines = (id) => $(id).value.split("\n").map((t) => t.trim()).filter(Boolean);
  vectorStatus.textContent = "running the prompts…";
  $("steer-vector-go").disabled = true;
  try {
    const made = await postJSON(`${api}/vectors`, {
      name: $("steer-vector-name").value, sae_id: saeSelect.value,
      positive: lines("steer-vector-positive"), negative: lines("steer-vector-negative"),
      position: $("steer-vector-position").value,
    });
    vectorStatus.textContent = `saved ${made.name} (norm ${fmtNum(made.norm)}); add it above`;
    const table = $("steer-vector-aligned");
    table.tBodies[0].replaceChildren(...made.aligned.map((a) => el("tr", {},
      el("td", {}, el("a", { href: featureUrl(made.sae_id, a.index), textContent: `#${a.index}` })),
      el("td", { className: "num", textContent: fmtNum(a.cosine) }),
      el("td", { className: "label-cell" }, el("span", {
        className: a.label ? "label" : "label unlabeled", textContent: a.label || "unlabeled" })))));
    table.hidden = false;
    await loadVectors();
    vectorPick.value = made.name;
  } catch (err) {
    vectorStatus.textContent = err.message;
  } finally {
    $("steer-vector-go").disabled = false;
  }
});

// --- sweep ---------------------------------------------------------------------------------

$("steer-sweep").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const sweepStatus = $("steer-sweep-status");
  const feature = features[0];
  if (!feature) {
    sweepStatus.textContent = "add a feature first";
    return;
  }
  const values = $("steer-sweep-values").value.split(/[,\s]+/).filter(Boolean).map(Number);
  const scale = feature.units === "max" && feature.maxAct && feature.mode !== "multiply" ? feature.maxAct : 1;
  const { features: _f, vectors: _v, ...settings } = buildRequest();
  sweepStatus.textContent = "sweeping…";
  $("steer-sweep-go").disabled = true;
  try {
    const out = await postJSON(`${api}/sweep`, {
      ...settings, sae_id: feature.sae_id, index: feature.index,
      mode: feature.mode === "ablate" ? "clamp" : feature.mode, values: values.map((v) => v * scale),
    });
    renderSweep(out, scale);
    sweepStatus.textContent = "";
  } catch (err) {
    sweepStatus.textContent = err.message;
  } finally {
    $("steer-sweep-go").disabled = false;
  }
});

function renderSweep(out, scale) {
  const grid = $("steer-sweep-grid");
  const rows = [{ label: "default", ...out.default }, ...out.cells.map((c) => ({ label: fmtNum(c.value / scale), ...c }))];
  grid.tBodies[0].replaceChildren(...rows.map((r) => el("tr", {},
    el("td", { className: "num", textContent: r.label }),
    el("td", { className: "num", textContent: r.realised === null ? "–" : fmtNum(r.realised) }),
    el("td", { className: "num", textContent: r.coherence === null ? "–" : fmtNum(r.coherence) }),
    el("td", { className: "text", textContent: r.text }))));
  grid.hidden = false;
  const plot = $("steer-sweep-plot");
  plot.hidden = false;
  const x = out.cells.map((c) => c.value / scale);
  withPlotly((Plotly) => {
    Plotly.newPlot(plot, [
      { x, y: out.cells.map((c) => c.realised), name: plotText("realised activation"), mode: "lines+markers" },
      { x, y: out.cells.map((c) => c.coherence), name: plotText("coherence (mean log-prob)"), mode: "lines+markers", yaxis: "y2" },
    ], {
      // Room on the right for the log-prob ticks (two decimals) and the axis title.
      margin: { l: 50, r: 64, t: 6, b: 34 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { size: 11 }, legend: { orientation: "h" },
      xaxis: { title: { text: plotText(`strength (${out.mode})`) } },
      yaxis: { title: { text: plotText("realised") } },
      yaxis2: { title: { text: plotText("log-prob") }, overlaying: "y", side: "right",
                tickformat: ".2f" },
    }, { displayModeBar: false, responsive: true }).then(() => { plot.dataset.rendered = "yes"; });
  });
}

// --- start ---------------------------------------------------------------------------------

applyPrefill(prefill);
onSaeChange();
