// Text search page: run the text through the model (POST /api/v1/saes/{sae}/search), show its
// tokens, the top features of the clicked token, and the features firing most over the text.

import { plotText, withPlotly } from "./plots.js";
import {
  fmtNum,
  onSubmitOrCtrlEnter,
  postJSON,
  renderTokens,
  tokenDisplay,
  tokenRepr,
} from "./tokens.js";

const root = document.querySelector("[data-text-search]");
const form = root.querySelector("form");
const textarea = form.querySelector("textarea");
const button = form.querySelector("button");
const status = root.querySelector(".search-status");
const results = root.querySelector(".search-results");
const tokenBox = document.getElementById("search-tokens");
const tokenTable = document.getElementById("token-features").tBodies[0];
const tokenTitle = document.getElementById("token-features-title");
const textTable = document.getElementById("text-features").tBodies[0];
const featureBase = root.dataset.featureBase;
const apiBase = root.dataset.apiBase;
const profile = document.getElementById("feature-profile");
const shadingNote = document.getElementById("shading-note");
const shadingReset = document.getElementById("shading-reset");
const DEFAULT_NOTE = shadingNote.textContent;

function featureLink(index) {
  const a = document.createElement("a");
  a.href = `${featureBase}/${index}`;
  a.textContent = `#${index}`;
  a.dataset.featureLink = String(index);
  return a;
}

function cell(content, className = "") {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.append(content);
  else td.textContent = content;
  return td;
}

function labelCell(label) {
  const span = document.createElement("span");
  span.className = label ? "label" : "label unlabeled";
  span.textContent = label || "unlabeled";
  return cell(span, "label-cell");
}

function headerRow(table, names) {
  const tr = document.createElement("tr");
  for (const [name, numeric] of names) {
    const th = document.createElement("th");
    th.textContent = name;
    if (numeric) th.className = "num";
    tr.append(th);
  }
  table.parentElement.tHead?.remove();
  table.parentElement.createTHead().append(tr);
}

function emptyRow(table, text, span) {
  const tr = document.createElement("tr");
  const td = cell(text, "muted empty");
  td.colSpan = span;
  tr.append(td);
  table.append(tr);
}

let current = null;
let spans = [];
let strongest = [];

function shadeBy(values) {
  const top = Math.max(0, ...values);
  spans.forEach((span, i) => {
    const v = values[i] ?? 0;
    span.style.setProperty("--a", top > 0 && v > 0 ? Math.min(v / top, 1).toFixed(2) : "0");
    span.classList.toggle("on", v > 0);
    span.dataset.v = fmtNum(v);
  });
}

function resetShading() {
  shadeBy(strongest);
  profile.hidden = true;
  shadingReset.hidden = true;
  shadingNote.textContent = DEFAULT_NOTE;
  for (const tr of textTable.rows) tr.classList.remove("selected-feature");
}

/** Shade the text by one feature's activation on every token, and plot it per position. */
async function showFeature(f, tr) {
  shadingNote.textContent = `loading feature #${f.index}…`;
  try {
    const data = await postJSON(`${apiBase}/features/${f.index}/activations`, { text: current.text });
    const values = data.values.map((v, i) => (data.special[i] ? 0 : v));
    shadeBy(values);
    for (const row of textTable.rows) row.classList.toggle("selected-feature", row === tr);
    shadingNote.textContent = `shading: feature #${f.index}${f.label ? " · " + f.label : ""} (max ${fmtNum(data.maxValue)})`;
    shadingReset.hidden = false;
    profile.hidden = false;
    const x = values.map((_, i) => i);
    // Tokens and labels are model/user text: entity-escaped, since Plotly renders some HTML.
    const hover = data.tokens.map((t, i) => plotText(`${i} ${tokenRepr(t)}: ${fmtNum(values[i])}`));
    const ticks = data.tokens.map((t) => plotText(tokenDisplay(t)));
    withPlotly((Plotly) => {
      Plotly.react(profile, [{
        type: "bar", x, y: values, hovertext: hover, hoverinfo: "text",
        marker: { color: values.map((v) => `rgba(242, 125, 20, ${(0.25 + 0.75 * (v / Math.max(data.maxValue, 1e-9))).toFixed(2)})`) },
      }], {
        margin: { l: 40, r: 8, t: 8, b: 60 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
        font: { size: 11 }, bargap: 0.1, showlegend: false,
        title: { text: plotText(`#${f.index} ${f.label ?? ""}`), font: { size: 12 }, x: 0.01, y: 0.97 },
        xaxis: { tickmode: "array", tickvals: x, ticktext: ticks, tickangle: -60, tickfont: { family: "monospace", size: 10 } },
        yaxis: { gridcolor: "#eef1f4", zeroline: false },
      }, { displayModeBar: false, responsive: true }).then(() => { profile.dataset.rendered = String(f.index); });
    });
  } catch (err) {
    shadingNote.textContent = err.message;
  }
}

shadingReset.addEventListener("click", resetShading);

function selectToken(i) {
  spans.forEach((s, j) => s.classList.toggle("selected", j === i));
  const token = current.tokens[i];
  tokenTitle.textContent = `Features on token ${i} ${tokenRepr(token)}`;
  tokenTable.replaceChildren();
  headerRow(tokenTable, [["#", true], ["label", false], ["activation", true]]);
  const row = current.per_token[i] || [];
  if (row.length === 0) emptyRow(tokenTable, current.special[i] ? "special token (not encoded)" : "no feature fires here", 3);
  for (const f of row) {
    const tr = document.createElement("tr");
    tr.append(cell(featureLink(f.index), "num"), labelCell(f.label), cell(fmtNum(f.value), "num"));
    tokenTable.append(tr);
  }
}

function render(data, text) {
  current = { ...data, text };
  profile.hidden = true;
  shadingReset.hidden = true;
  shadingNote.textContent = DEFAULT_NOTE;
  // Shade each token by its strongest feature; special tokens (BOS) stay unshaded.
  strongest = data.per_token.map((row, i) => (data.special[i] || row.length === 0 ? 0 : row[0].value));
  const best = strongest.reduce((b, v, i) => (v > strongest[b] ? i : b), 0);
  spans = renderTokens(tokenBox, data.tokens, strongest, { maxIndex: strongest[best] > 0 ? best : -1 });
  spans.forEach((span, i) => {
    if (data.special[i]) span.classList.add("special");
    // Reached with the arrow keys from the token box (app.js); Enter selects.
    span.addEventListener("click", () => selectToken(i));
    span.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") selectToken(i);
    });
  });

  textTable.replaceChildren();
  headerRow(textTable, [["#", true], ["label", false], ["max", true], ["tokens", true], ["sum", true]]);
  if (data.top_features.length === 0) emptyRow(textTable, "no feature fires on this text", 5);
  for (const f of data.top_features) {
    const tr = document.createElement("tr");
    tr.append(
      cell(featureLink(f.index), "num"),
      labelCell(f.label),
      cell(fmtNum(f.max_value), "num"),
      cell(String(f.n_tokens), "num"),
      cell(fmtNum(f.sum_value), "num"),
    );
    tr.addEventListener("click", (ev) => {
      if (!ev.target.closest("a")) showFeature(f, tr);
    });
    // Keyboard: each row is a tab stop; Enter or Space shades the text by its feature.
    tr.tabIndex = 0;
    tr.title = "Enter: shade the text by this feature";
    tr.addEventListener("keydown", (ev) => {
      if ((ev.key === "Enter" || ev.key === " ") && ev.target === tr) {
        ev.preventDefault();
        showFeature(f, tr);
      }
    });
    // Hovering or focusing a feature points at the token where it peaks.
    const peak = (on) => spans[f.max_token_index]?.classList.toggle("peak", on);
    tr.addEventListener("mouseenter", () => peak(true));
    tr.addEventListener("mouseleave", () => peak(false));
    tr.addEventListener("focus", () => peak(true));
    tr.addEventListener("blur", () => peak(false));
    textTable.append(tr);
  }
  results.hidden = false;
  selectToken(strongest[best] > 0 ? best : 0);
}

async function run() {
  const text = textarea.value;
  if (!text.trim()) return;
  const url = new URL(window.location.href);
  url.searchParams.set("text", text);
  window.history.replaceState(null, "", url);
  button.disabled = true;
  status.classList.remove("error");
  status.textContent = "running the model…";
  const t0 = performance.now();
  try {
    const data = await postJSON(root.dataset.api, { text });
    render(data, text);
    status.textContent = `${data.tokens.length} tokens · ${Math.round(performance.now() - t0)} ms`;
  } catch (err) {
    status.classList.add("error");
    status.textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

onSubmitOrCtrlEnter(form, textarea, run);
if (textarea.value.trim()) run();
