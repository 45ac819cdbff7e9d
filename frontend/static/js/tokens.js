// Token runs built in the browser (test box, text search): every token is set with textContent.

const VISIBLE = { "\n": "↵", "\r": "␍", "\t": "⇥" };

/** How a token reads in a run; mirrors app/web/templating.py token_display. */
export function tokenDisplay(token) {
  if (token === "") return "∅";
  if (/^ +$/.test(token)) return "·".repeat(token.length);
  return token.replace(/[\n\r\t]/g, (ch) => VISIBLE[ch]);
}

/** The exact token, quoted, with escapes for invisible characters; mirrors token_repr. */
export function tokenRepr(token) {
  let out = "";
  for (const ch of token) {
    const code = ch.codePointAt(0);
    if (ch === "\n") out += "\\n";
    else if (ch === "\t") out += "\\t";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\\") out += "\\\\";
    else if (code < 32 || code === 127) out += "\\x" + code.toString(16).padStart(2, "0");
    else out += ch;
  }
  return "“" + out + "”";
}

/** A number with three significant digits, like the server's |num filter. */
export function fmtNum(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value === 0) return "0";
  const mag = Math.abs(value);
  if (mag >= 10 ** digits) return Math.round(value).toLocaleString("en-US");
  if (mag < 1e-3) return value.toExponential(Math.max(digits - 1, 0));
  const decimals = Math.max(digits - 1 - Math.floor(Math.log10(mag)), 0);
  return value.toFixed(decimals);
}

/**
 * Fill `box` with one span per token, shaded by value / max.
 * Returns the spans so callers can attach selection behaviour.
 */
export function renderTokens(box, tokens, values, { max = null, maxIndex = -1 } = {}) {
  box.replaceChildren();
  const top = max ?? Math.max(0, ...values.filter((v) => Number.isFinite(v)));
  const spans = tokens.map((token, i) => {
    const v = values[i] ?? 0;
    const span = document.createElement("span");
    span.className = "t" + (v > 0 ? " on" : "") + (i === maxIndex ? " max" : "");
    span.style.setProperty("--a", top > 0 && v > 0 ? Math.min(v / top, 1).toFixed(2) : "0");
    span.dataset.v = fmtNum(v);
    span.dataset.tok = tokenRepr(token);  // exact token for the tooltip
    span.dataset.i = String(i);
    span.textContent = tokenDisplay(token);
    return span;
  });
  box.append(...spans);
  return spans;
}

/** POST JSON and return the parsed body; errors carry the API's one error message. */
export async function postJSON(url, body) {
  const res = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(body),
  });
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const msg = data?.error?.message ?? `request failed (${res.status})`;
    const retry = res.headers.get("Retry-After");
    throw new Error(retry ? `${msg} (retry in ${retry}s)` : msg);
  }
  return data;
}

// Run `submit` on the form's submit and on Ctrl/Cmd+Enter in its textarea (both text boxes).
export function onSubmitOrCtrlEnter(form, textarea, submit) {
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    submit();
  });
  textarea.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      submit();
    }
  });
}
