// Plotly charts fed from <script type="application/json"> blocks; all text passed to Plotly is
// entity-escaped first, because Plotly renders a subset of HTML in titles and hover labels.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function plotText(s) {
  return String(s).replace(/[&<>"']/g, (ch) => ESCAPES[ch]);
}

const CONFIG = { displayModeBar: false, responsive: true };
const FONT = { family: 'system-ui, "DejaVu Sans", sans-serif', size: 11, color: "#4a5563" };

function layout(extra) {
  return {
    margin: { l: 44, r: 8, t: 6, b: 34 },
    paper_bgcolor: "rgba(0,0,0,0)",
    plot_bgcolor: "rgba(0,0,0,0)",
    font: FONT,
    bargap: 0.04,
    showlegend: false,
    hoverlabel: { font: { family: FONT.family, size: 12 } },
    ...extra,
  };
}

function axis(title, extra = {}) {
  return {
    title: { text: plotText(title), font: { size: 11 } },
    gridcolor: "#eef1f4",
    zeroline: false,
    linecolor: "#e3e7ec",
    ...extra,
  };
}

/** Wait for the deferred Plotly bundle (module scripts may run first in some browsers). */
export function withPlotly(fn) {
  if (window.Plotly) return fn(window.Plotly);
  window.addEventListener("load", () => window.Plotly && fn(window.Plotly), { once: true });
}

function readData(id) {
  const node = document.getElementById(id);
  return node ? JSON.parse(node.textContent) : null;
}

function markEmpty(el) {
  el.classList.add("empty");
  el.dataset.rendered = "empty";
}

/** A histogram from {edges, counts}: bars between consecutive edges. */
export function barHistogram(el) {
  const data = readData(el.dataset.source);
  if (!data || !data.counts || data.counts.length === 0 || data.counts.every((c) => c === 0)) {
    markEmpty(el);
    return;
  }
  const { edges, counts } = data;
  // Empty bins at either end only stretch the axis: keep one on each side of the data.
  const nonzero = counts.map((c, i) => (c > 0 ? i : -1)).filter((i) => i >= 0);
  const lo = Math.max(nonzero[0] - 1, 0);
  const hi = Math.min(nonzero[nonzero.length - 1] + 1, counts.length - 1);
  const idx = [];
  for (let i = lo; i <= hi; i++) idx.push(i);
  const x = idx.map((i) => (edges[i] + edges[i + 1]) / 2);
  const width = idx.map((i) => edges[i + 1] - edges[i]);
  const y = idx.map((i) => counts[i]);
  const text = idx.map((i) =>
    plotText(`${edges[i].toPrecision(3)} – ${edges[i + 1].toPrecision(3)}: ${counts[i].toLocaleString("en-US")}`),
  );
  withPlotly((Plotly) => {
    Plotly.newPlot(
      el,
      [{ type: "bar", x, y, width, text, textposition: "none", hovertemplate: "%{text}<extra></extra>",
         marker: { color: "rgba(47, 95, 208, 0.75)" } }],
      layout({ xaxis: axis(el.dataset.xtitle || ""), yaxis: axis(el.dataset.ytitle || "") }),
      CONFIG,
    ).then(() => { el.dataset.rendered = "yes"; el.dataset.points = String(idx.length); });
  });
}

/**
 * Score histograms: {edges, series: [{name, counts, control?}]} over [0, 1], one group of bars
 * per bin, one colour per series (controls, random explanations, in grey), with a legend.
 */
export function scoreHistogram(el) {
  const data = readData(el.dataset.source);
  if (!data || !data.series || data.series.every((s) => s.counts.every((c) => c === 0))) {
    markEmpty(el);
    return;
  }
  const { edges } = data;
  const x = edges.slice(0, -1).map((lo, i) => (lo + edges[i + 1]) / 2);
  const colours = ["rgba(47, 95, 208, 0.8)", "rgba(23, 122, 66, 0.8)", "rgba(143, 91, 15, 0.8)",
    "rgba(194, 59, 59, 0.8)"];
  let next = 0;
  const traces = data.series.map((s) => ({
    type: "bar",
    name: plotText(s.name),
    x,
    y: s.counts,
    text: s.counts.map((c, i) => plotText(`${s.name}: ${c} with ${edges[i].toFixed(2)} – ${edges[i + 1].toFixed(2)}`)),
    textposition: "none",
    hovertemplate: "%{text}<extra></extra>",
    marker: { color: s.control ? "rgba(92, 103, 117, 0.45)" : colours[next++ % colours.length] },
  }));
  withPlotly((Plotly) => {
    Plotly.newPlot(
      el,
      traces,
      layout({
        barmode: "group",
        bargap: 0.15,
        showlegend: true,
        legend: { orientation: "h", y: -0.3, font: { size: 11 } },
        margin: { l: 44, r: 8, t: 6, b: 70 },
        xaxis: axis(el.dataset.xtitle || "", { range: [0, 1] }),
        yaxis: axis(el.dataset.ytitle || ""),
      }),
      CONFIG,
    ).then(() => { el.dataset.rendered = "yes"; el.dataset.points = String(traces.length); });
  });
}

/**
 * The feature's activation histogram on log-spaced bins, each bar coloured by the interval band
 * its centre falls in (bands are equal-width over (0, max]).
 */
export function activationHistogram(el, data) {
  if (!data || !data.counts || data.counts.every((c) => c === 0)) {
    markEmpty(el);
    return;
  }
  const { edges, counts, band_edges: bandEdges = [] } = data;
  const keep = counts.map((c, i) => i).filter((i) => counts[i] > 0 || (i > 0 && counts[i - 1] > 0));
  const lo = keep.length ? keep[0] : 0;
  const hi = keep.length ? keep[keep.length - 1] : counts.length - 1;
  const idx = [];
  for (let i = lo; i <= hi; i++) idx.push(i);
  const nBands = Math.max(bandEdges.length - 1, 1);
  const bandOf = (v) => {
    for (let b = 0; b < nBands; b++) if (v <= bandEdges[b + 1]) return b;
    return nBands - 1;
  };
  const centre = (i) => Math.sqrt(edges[i] * edges[i + 1]);
  const colors = idx.map((i) => {
    const band = bandEdges.length > 1 ? bandOf(centre(i)) : nBands - 1;
    const alpha = 0.25 + (0.75 * (band + 1)) / nBands;
    return `rgba(242, 125, 20, ${alpha.toFixed(2)})`;
  });
  const text = idx.map((i) => {
    const band = bandEdges.length > 1 ? ` · band ${bandOf(centre(i)) + 1}` : "";
    return plotText(`${edges[i].toPrecision(3)} – ${edges[i + 1].toPrecision(3)}: ${counts[i].toLocaleString("en-US")} tokens${band}`);
  });
  withPlotly((Plotly) => {
    Plotly.newPlot(
      el,
      [{
        type: "bar",
        x: idx.map(centre),
        y: idx.map((i) => counts[i]),
        width: idx.map((i) => edges[i + 1] - edges[i]),
        text,
        textposition: "none",
        hovertemplate: "%{text}<extra></extra>",
        marker: { color: colors, line: { width: 0 } },
      }],
      layout({
        xaxis: axis("activation", { type: "log" }),
        yaxis: axis("tokens"),
        bargap: 0,
      }),
      CONFIG,
    ).then(() => { el.dataset.rendered = "yes"; el.dataset.points = String(idx.length); });
  });
}
