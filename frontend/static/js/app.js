// Behaviour shared by every page: token tooltips, keyboard shortcuts, window expansion, charts.

import { barHistogram } from "./plots.js";

const tooltip = document.getElementById("tooltip");

function showTooltip(target, x, y) {
  // data-tok is set only where the shown text differs from the token (whitespace, controls).
  const tok = target.dataset.tok || `“${target.textContent}”`;
  const val = document.createElement("span");
  val.className = "tt-val";
  val.textContent = target.dataset.v ?? "0";
  const label = document.createElement("span");
  label.textContent = tok + "  ";
  tooltip.replaceChildren(label, val);
  tooltip.hidden = false;
  const pad = 12;
  const rect = tooltip.getBoundingClientRect();
  const left = Math.min(x + pad, window.innerWidth - rect.width - 4);
  const top = y + pad + rect.height > window.innerHeight ? y - rect.height - pad : y + pad;
  tooltip.style.left = `${Math.max(left, 4)}px`;
  tooltip.style.top = `${Math.max(top, 4)}px`;
}

document.addEventListener("mouseover", (ev) => {
  const t = ev.target.closest?.(".t");
  if (t) showTooltip(t, ev.clientX, ev.clientY);
});
document.addEventListener("mousemove", (ev) => {
  if (!tooltip.hidden && ev.target.closest?.(".t")) showTooltip(ev.target.closest(".t"), ev.clientX, ev.clientY);
});
document.addEventListener("mouseout", (ev) => {
  if (ev.target.closest?.(".t")) tooltip.hidden = true;
});

// A click on a window row toggles between the centred one-line view and the whole window.
document.addEventListener("click", (ev) => {
  const win = ev.target.closest?.("[data-win]");
  if (win && !window.getSelection()?.toString()) win.classList.toggle("expanded");
});
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && ev.target.matches?.("[data-win]")) ev.target.classList.toggle("expanded");
});

// The SAE chooser beside the top search box points the form at that SAE's search page.
const saeSwitch = document.querySelector("[data-sae-switch]");
if (saeSwitch) {
  saeSwitch.removeAttribute("name");
  saeSwitch.addEventListener("change", () => {
    saeSwitch.form.action = saeSwitch.value;
  });
}

function typing(ev) {
  const el = ev.target;
  return el.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName);
}

function navTo(selector) {
  const link = document.querySelector(`[data-nav="${selector}"]`);
  if (link?.href) window.location.assign(link.href);
}

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.key === "Escape" && typing(ev)) {
    ev.target.blur();
    return;
  }
  if (typing(ev)) return;
  if (ev.key === "/") {
    const input = document.getElementById("search-text") || document.getElementById("top-search-input");
    if (input) {
      ev.preventDefault();
      input.focus();
      input.select?.();
    }
  } else if (ev.key === "j") navTo("next");
  else if (ev.key === "k") navTo("prev");
  else if (ev.key === "r") navTo("random");
});

for (const el of document.querySelectorAll('[data-plot="bar-histogram"]')) barHistogram(el);
