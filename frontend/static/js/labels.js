// Labels in the browser: the API calls with ETags, word-level diffs, and the feature page's
// editor (my label, everyone's labels, history, conflict merge). Every label text is set with
// textContent inside <bdi>, so it is shown literally and cannot reorder the page around it.

/** fetch that returns {res, data}: data is the parsed JSON body, or null. */
export async function api(url, { method = "GET", body, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(url, init);
  let data = null;
  if (res.status !== 204) {
    try {
      data = await res.json();
    } catch {
      data = null;
    }
  }
  return { res, data };
}

const ROLE_RANK = { viewer: 0, annotator: 1, reviewer: 2, admin: 3 };

/** What the signed-in person may do (base.html puts their role on <body>; the server checks). */
export function can(role) {
  return (ROLE_RANK[document.body.dataset.role] ?? 0) >= ROLE_RANK[role];
}

export function errorText(res, data) {
  return data?.error?.message ?? `request failed (${res.status})`;
}

/** An element with text (never markup). */
export function el(tag, text = "", className = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

/** A label's text, isolated for bidi and wrapped anywhere (see .label in app.css). */
export function labelText(text) {
  if (!text) return el("span", "unlabeled", "label unlabeled");
  return el("bdi", text, "label");
}

/** Word-level diff of two texts: [["same"|"del"|"ins", text], ...] (LCS over words). */
export function wordDiff(before, after) {
  const a = (before ?? "").split(/(\s+)/).filter((s) => s !== "");
  const b = (after ?? "").split(/(\s+)/).filter((s) => s !== "");
  const n = a.length;
  const m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const ops = [];
  const push = (kind, text) => {
    const last = ops[ops.length - 1];
    if (last && last[0] === kind) last[1] += text;
    else ops.push([kind, text]);
  };
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) {
      push("same", a[i]);
      i++;
      j++;
    } else if (lcs[i + 1][j] >= lcs[i][j + 1]) push("del", a[i++]);
    else push("ins", b[j++]);
  }
  while (i < n) push("del", a[i++]);
  while (j < m) push("ins", b[j++]);
  return ops;
}

/** The diff as nodes: <del>/<ins> around changed words, inside one isolated <bdi>. */
export function diffNode(before, after) {
  const box = el("bdi", "", "label diff");
  for (const [kind, text] of wordDiff(before, after)) {
    box.append(kind === "same" ? document.createTextNode(text) : el(kind, text));
  }
  return box;
}

function fieldChanges(before, after) {
  const out = [];
  for (const key of ["status", "tags", "confidence", "notes"]) {
    const b = JSON.stringify(before?.[key] ?? null);
    const a = JSON.stringify(after?.[key] ?? null);
    if (b === a) continue;
    // A new label lists the fields it was given, not every default as a change from nothing.
    if (before === null) {
      if (!["null", '""', "[]"].includes(a)) out.push(`${key}: ${a}`);
    } else {
      out.push(`${key}: ${b} → ${a}`);
    }
  }
  return out;
}

export function historyItem(rev) {
  const li = el("li", "", "revision");
  const when = new Date(rev.created_at + (rev.created_at.endsWith("Z") || rev.created_at.includes("+") ? "" : "Z"));
  const head = el("div", "", "rev-head");
  head.append(el("span", `v${rev.version}`, "rev-version"), el("span", rev.action, "rev-action"),
    el("bdi", rev.actor, "rev-actor"), el("time", when.toLocaleString(), "muted small"));
  li.append(head, diffNode(rev.before?.description ?? "", rev.after?.description ?? ""));
  for (const change of fieldChanges(rev.before, rev.after)) li.append(el("div", change, "rev-field muted small"));
  return li;
}

const REVIEWS = [["accepted", "Accept"], ["rejected", "Reject"], ["needs_review", "Send back"]];

/** POST a review based on the label's version (If-Match: its ETag); {res, data}. */
export function review(base, label, status) {
  return api(`${base}/labels/${label.id}/review`, {
    method: "POST", body: { status }, headers: { "If-Match": label.etag },
  });
}

function fmtScore(value) {
  return value === null || value === undefined ? "–" : value.toFixed(2);
}

/** A label's scores: per method and scorer its balanced accuracy (0.5 is chance), with the
 *  same scorer's accuracy for a random other feature's explanation beside it. */
export function scoresTable(scores) {
  const table = el("table", "", "label-scores");
  table.append(el("caption", "how well this text predicts where the feature fires (balanced accuracy; 0.5 is chance)", "muted small"));
  const head = el("tr");
  for (const text of ["method", "score", "random explanation", "windows", "scorer"]) {
    const th = el("th", text);
    th.scope = "col";
    head.append(th);
  }
  const body = el("tbody");
  const order = (s) => `${s.method === "detection" ? 0 : 1} ${s.scorer} ${s.seed}`;
  for (const s of [...scores].sort((a, b) => order(a).localeCompare(order(b)))) {
    const row = el("tr");
    const method = el("th", s.method);
    method.scope = "row";
    const score = el("td", fmtScore(s.score), "num score-value");
    if (s.score === null && s.details?.skipped) score.title = s.details.skipped;
    const control = el("td", fmtScore(s.control_score), "num");
    const source = s.details?.control;
    if (source?.explanation) control.title = `${source.source}: ${source.explanation}`;
    const scorer = el("td");
    scorer.append(el("bdi", s.scorer));
    row.append(method, score, control, el("td", String(s.n_windows), "num"), scorer);
    body.append(row);
  }
  const thead = el("thead");
  thead.append(head);
  table.append(thead, body);
  return table;
}

/** Score a label's text with the server's model (detection and fuzzing; slow on a CPU). */
export function scoreLabel(base, label) {
  return api(`${base}/labels/${label.id}/score`, { method: "POST", body: {} });
}

/** One label of a feature, with the scores of its text; with `onReview`, a reviewer's buttons
 *  for the other statuses; with `onScore`, a button that scores its text. */
export function labelRow(label, shownId, onReview = null, onScore = null) {
  const li = el("li", "", "label-row" + (label.id === shownId ? " shown" : "")
    + (label.author_kind === "automatic" ? " automatic" : ""));
  li.dataset.labelId = String(label.id);
  li.append(labelText(label.description));
  for (const tag of label.tags ?? []) li.append(el("span", tag, "tag"));
  const meta = el("span", "", "muted small label-meta");
  meta.append(el("bdi", label.author), document.createTextNode(
    ` · ${label.author_kind === "automatic" ? "automatic · " : ""}${label.status.replace("_", " ")} · v${label.version}`));
  li.append(meta);
  if (label.id === shownId) li.append(el("span", "shown", "badge"));
  const buttons = el("span", "", "review-buttons");
  if (onReview) {
    for (const [status, text] of REVIEWS) {
      if (status === label.status || (status === "needs_review" && label.status === "draft")) continue;
      const button = el("button", text, "subtle small");
      button.type = "button";
      button.dataset.review = status;
      button.addEventListener("click", () => onReview(label, status));
      buttons.append(button);
    }
  }
  if (onScore && label.description) {
    const button = el("button", "Score", "subtle small");
    button.type = "button";
    button.dataset.score = "";
    button.setAttribute("aria-label", `Score the label by ${label.author}`);
    button.addEventListener("click", () => {
      button.disabled = true;
      onScore(label);
    });
    buttons.append(button);
  }
  if (buttons.children.length) li.append(buttons);
  if (label.scores?.length) li.append(scoresTable(label.scores));
  return li;
}

/** The page header's label: the shown one, after a review may have changed it. */
function showHeader(labels, shownId) {
  const head = document.querySelector(".feature-label");
  if (!head) return;
  const shown = labels.find((l) => l.id === shownId);
  head.replaceChildren(labelText(shown?.description ?? ""));
  for (const tag of shown?.tags ?? []) head.append(" ", el("span", tag, "tag"));
  const drafts = labels.filter((l) => l.author_kind === "automatic" && l.status === "draft").length;
  if (drafts) {
    const link = el("a", `${drafts} automatic draft${drafts === 1 ? "" : "s"} to review`, "small");
    link.href = "#labels";
    link.dataset.draftsLink = "";
    head.append(" ", link);
  }
}

function formValues(form) {
  const conf = form.elements.confidence.value.trim();
  return {
    description: form.elements.description.value,
    tags: form.elements.tags.value.split(/[\s,]+/).filter((t) => t),
    status: form.elements.status.value,
    confidence: conf === "" ? null : Number(conf),
    notes: form.elements.notes.value,
  };
}

function fillForm(form, label) {
  form.elements.description.value = label?.description ?? "";
  form.elements.tags.value = (label?.tags ?? []).join(" ");
  // Only reviewers set accepted or rejected; an annotator's edit of a reviewed label goes back
  // to review (the select offers them draft and needs review only).
  const status = label?.status ?? "draft";
  const offered = [...form.elements.status.options].some((o) => o.value === status);
  form.elements.status.value = offered ? status : "needs_review";
  form.elements.confidence.value = label?.confidence ?? "";
  form.elements.notes.value = label?.notes ?? "";
}

/** The feature page's label editor. */
export function labelEditor(box) {
  const base = box.dataset.api;
  const form = box.querySelector("[data-label-form]");
  const status = box.querySelector("[data-label-status]");
  const all = box.querySelector("[data-all-labels]");
  const history = box.querySelector("[data-history-list]");
  const conflict = box.querySelector("[data-conflict]");
  const withdraw = box.querySelector("[data-withdraw]");
  // Scoring asks the server's model: offered when it has one and to annotators (the route's role).
  const scoring = box.dataset.canScore === "yes" && can("annotator");
  let etag = null;
  if (!can("reviewer")) {
    for (const option of [...form.elements.status.options]) {
      if (option.value === "accepted" || option.value === "rejected") option.remove();
    }
  }
  if (!can("annotator")) {
    form.hidden = true;
    box.querySelector("[data-read-only]").hidden = false;
  }

  /** A note under a label's row, where its Score button is: "scoring…", or why the server
   *  could not score it (its message, as an alert). False when the row is gone. */
  function scoreNote(labelId, text, { error = false } = {}) {
    const row = all.querySelector(`.label-row[data-label-id="${labelId}"]`);
    if (!row) return false;
    row.querySelector("[data-score-note]")?.remove();
    const note = el("p", text, `score-note small ${error ? "error-text" : "muted"}`);
    note.dataset.scoreNote = error ? "error" : "progress";
    if (error) note.setAttribute("role", "alert");
    row.insertBefore(note, row.querySelector("table.label-scores"));
    return true;
  }

  async function onScore(label) {
    const who = `the label by ${label.author}`;
    scoreNote(label.id, "scoring: the model reads dozens of windows, which can take a minute…");
    status.textContent = `scoring ${who}…`;
    const { res, data } = await scoreLabel(base, label);
    await refresh({ keepForm: true });
    if (res.ok) {
      status.textContent = `scored ${who}: ${data.scores.map((s) => `${s.method} ${fmtScore(s.score)} (random ${fmtScore(s.control_score)})`).join(", ")}`;
      return;
    }
    // Said where the button was (the form's status line is far below it, and muted).
    const why = `could not score ${who}: ${errorText(res, data)}`;
    status.textContent = scoreNote(label.id, why, { error: true }) ? "" : why;
  }

  async function onReview(label, verdict) {
    const { res, data } = await review(base, label, verdict);
    await refresh({ keepForm: true });
    status.textContent = res.ok
      ? `${label.author}'s label: ${data.status.replace("_", " ")} (v${data.version})`
      : res.status === 412 ? "that label changed meanwhile: reloaded, review it again" : errorText(res, data);
  }

  async function refresh({ keepForm = false } = {}) {
    const [mine, everyone, revs] = await Promise.all([
      api(`${base}/label`), api(`${base}/labels`), api(`${base}/labels/history`),
    ]);
    etag = mine.res.ok ? mine.res.headers.get("ETag") : null;
    if (!keepForm) {
      fillForm(form, mine.res.ok ? mine.data : null);
      const verdict = mine.data?.status;
      if (mine.res.ok && !can("reviewer") && (verdict === "accepted" || verdict === "rejected")) {
        status.textContent = `${mine.data.reviewed_by ?? "a reviewer"} ${verdict} this label; `
          + "saving an edit sends it back for review";
      }
    }
    withdraw.hidden = etag === null;
    const reviewer = can("reviewer") ? onReview : null;
    const labels = everyone.data?.data ?? [];
    all.replaceChildren(...labels.map((l) => labelRow(l, everyone.data.shown_id, reviewer, scoring ? onScore : null)));
    if (everyone.res.ok) showHeader(labels, everyone.data.shown_id);
    if (!all.children.length) all.append(el("li", "no labels yet", "muted"));
    history.replaceChildren(...(revs.data?.data ?? []).map(historyItem));
    if (!history.children.length) history.append(el("li", "no changes yet", "muted"));
    return mine;
  }

  async function save() {
    const mineText = form.elements.description.value;
    const headers = etag ? { "If-Match": etag } : { "If-None-Match": "*" };
    const { res, data } = await api(`${base}/label`, { method: "PUT", body: formValues(form), headers });
    if (res.ok) {
      conflict.hidden = true;
      // Reload first, then say "saved": a save made right after this one is then based on
      // the new version (ETag) and the history already lists this revision.
      await refresh();
      status.textContent = `saved (v${data.version})`;
      return;
    }
    if (res.status === 412) {
      // Saved meanwhile (another tab, another device): show both texts; the next save is
      // based on the version just read, so it deliberately replaces it with the merge.
      const current = await refresh({ keepForm: true });
      conflict.querySelector("[data-theirs]").replaceChildren(labelText(current.data?.description ?? ""));
      conflict.querySelector("[data-yours]").replaceChildren(labelText(mineText));
      conflict.querySelector("[data-diff]").replaceChildren(diffNode(current.data?.description ?? "", mineText));
      conflict.hidden = false;
      status.textContent = "changed meanwhile: merge the texts below, then save again";
      form.elements.description.focus();
      return;
    }
    status.textContent = errorText(res, data);
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    save();
  });
  form.elements.description.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      ev.preventDefault();
      save();
    }
  });
  box.querySelector("[data-take-theirs]")?.addEventListener("click", () => {
    form.elements.description.value = conflict.querySelector("[data-theirs]").textContent;
  });
  withdraw.addEventListener("click", async () => {
    if (!etag) return;
    const { res, data } = await api(`${base}/label`, { method: "DELETE", headers: { "If-Match": etag } });
    status.textContent = res.ok ? "withdrawn (the history keeps it)" : errorText(res, data);
    await refresh();
  });
  refresh();
}

const editor = document.querySelector("[data-label-editor]");
if (editor) labelEditor(editor);
