// Behaviour shared by every page: token tooltips, keyboard reading of tokens, single-key
// shortcuts (which can be turned off), window expansion, charts.

import { barHistogram, scoreHistogram } from "./plots.js";

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
  // A BOS that opens another document in a packed window says which (data-doc).
  if (target.dataset.doc) {
    const doc = document.createElement("span");
    doc.className = "tt-doc";
    doc.textContent = target.dataset.doc;
    tooltip.append(doc);
  }
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
  if (ev.target.closest?.(".t") && ev.target !== document.activeElement) tooltip.hidden = true;
});

// Keyboard reading: a token row (a window, a token box) is one tab stop; the arrow keys move a
// roving focus over its tokens, and the focused token shows its value in the tooltip, which
// describes it for screen readers. Tokens get a tabindex only when reached, so a page with
// thousands of tokens keeps the markup the server sent.
const TOKEN_ROW = "[data-win], .token-box";

function focusToken(t) {
  if (!t.hasAttribute("tabindex")) t.tabIndex = -1;
  t.focus();
}

document.addEventListener("focusin", (ev) => {
  const t = ev.target;
  if (!t.matches?.(".t")) return;
  t.setAttribute("aria-describedby", "tooltip");
  const r = t.getBoundingClientRect();
  showTooltip(t, r.left - 12, r.bottom - 8);
});
document.addEventListener("focusout", (ev) => {
  if (!ev.target.matches?.(".t")) return;
  ev.target.removeAttribute("aria-describedby");
  tooltip.hidden = true;
});

function step(list, from, key) {
  const last = list.length - 1;
  if (key === "ArrowRight") return Math.min(from + 1, last);
  if (key === "ArrowLeft") return Math.max(from - 1, 0);
  if (key === "Home") return 0;
  if (key === "End") return last;
  return null;
}

document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const row = ev.target.closest?.(TOKEN_ROW);
  if (!row) return;
  const tokens = [...row.querySelectorAll(".t")];
  if (ev.target.matches(".t")) {
    if (ev.key === "Escape") {
      ev.preventDefault();
      tooltip.hidden = true;
      if (row.tabIndex >= 0) row.focus();
      return;
    }
    const to = step(tokens, tokens.indexOf(ev.target), ev.key);
    if (to !== null) {
      ev.preventDefault();
      focusToken(tokens[to]);
    }
  } else if (ev.target === row && tokens.length) {
    if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
      // Between the windows of one list.
      const rows = [...row.parentElement.children].filter((el) => el.matches("[data-win]"));
      const next = rows[rows.indexOf(row) + (ev.key === "ArrowDown" ? 1 : -1)];
      if (next) {
        ev.preventDefault();
        next.focus();
      }
      return;
    }
    if (step(tokens, 0, ev.key) === null) return;
    ev.preventDefault();
    // A centred window clips its ends: open it so every token read is in view.
    if (row.matches("[data-win]")) row.classList.add("expanded");
    const start = ev.key === "Home" ? tokens[0] : ev.key === "End" ? tokens[tokens.length - 1]
      : row.querySelector(".t.selected, .t.max") || tokens[0];
    focusToken(start);
  }
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

// WCAG 2.1.4: the single-key shortcuts can be turned off; the choice is kept in localStorage.
const SHORTCUTS_KEY = "saescope.shortcuts";
const shortcutsToggle = document.getElementById("shortcuts-toggle");

function storedShortcuts() {
  try {
    return window.localStorage.getItem(SHORTCUTS_KEY) !== "off";
  } catch {
    return true; // storage blocked: the default
  }
}

let shortcutsOn = storedShortcuts();

function showShortcuts() {
  if (!shortcutsToggle) return;
  shortcutsToggle.setAttribute("aria-pressed", String(shortcutsOn));
  shortcutsToggle.textContent = `single-key shortcuts: ${shortcutsOn ? "on" : "off"}`;
  shortcutsToggle.title = shortcutsOn ? "turn off the one-letter keys (/ j k r)"
    : "turn on the one-letter keys (/ j k r)";
}

shortcutsToggle?.addEventListener("click", () => {
  shortcutsOn = !shortcutsOn;
  try {
    window.localStorage.setItem(SHORTCUTS_KEY, shortcutsOn ? "on" : "off");
  } catch {
    // storage blocked: the choice lasts for this page
  }
  showShortcuts();
});
showShortcuts();

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
  if (typing(ev) || !shortcutsOn) return;
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
for (const el of document.querySelectorAll('[data-plot="score-histogram"]')) scoreHistogram(el);
