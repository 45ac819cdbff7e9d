// The labeling queue: type a description, Enter saves and moves on, Esc skips. In review mode
// the feature's labels waiting for review are listed instead: Enter accepts the first one (or
// the button with the focus acts), Esc skips. The server leases each feature to one person for
// a few minutes (POST .../queue/next). A feature's automatic drafts show with their scores (in
// review mode among the labels to accept); ?order= and ?mode= in the page's URL pick the queue.

import { api, el, errorText, labelRow, labelText, review } from "./labels.js";
import { fmtNum, renderTokens } from "./tokens.js";

const page = document.querySelector("[data-queue]");
if (page) {
  const saeApi = page.dataset.api;
  const featureBase = page.dataset.featureBase;
  const form = page.querySelector("[data-queue-form]");
  const card = page.querySelector("[data-queue-card]");
  const status = page.querySelector("[data-queue-status]");
  const done = page.querySelector("[data-queue-done]");
  const counter = page.querySelector("[data-queue-count]");
  let current = null;
  let saved = 0;
  const wanted = new URLSearchParams(window.location.search);
  for (const name of ["order", "mode"]) {
    const select = form.elements[name];
    const value = wanted.get(name);
    if (value && [...select.options].some((o) => o.value === value)) select.value = value;
  }

  function options() {
    const params = new URLSearchParams({ order: form.elements.order.value, mode: form.elements.mode.value });
    const seed = form.elements.seed.value.trim();
    if (seed) params.set("seed", seed);
    return params;
  }

  function showFeature(index, feature) {
    const link = page.querySelector("[data-queue-link]");
    link.href = featureBase + index;
    link.textContent = `#${index}`;
    page.querySelector("[data-queue-stats]").textContent =
      `density ${fmtNum(feature.frac_nonzero * 100)}% · max ${fmtNum(feature.max_act)}`;
    const logits = page.querySelector("[data-queue-logits]");
    logits.replaceChildren(...feature.pos_str.slice(0, 8).map((t) => el("span", t, "chip")));
    const windows = page.querySelector("[data-queue-windows]");
    windows.replaceChildren();
    for (const act of feature.activations.filter((a) => a.kind === "top").slice(0, 4)) {
      const row = el("div", "", "window token-box");
      renderTokens(row, act.tokens, act.values, { max: feature.max_act, maxIndex: act.maxValueTokenIndex });
      windows.append(row);
    }
    const label = feature.label;
    const existing = page.querySelector("[data-queue-existing]");
    existing.replaceChildren();
    if (label) existing.append("shown now: ", labelText(label.description));
    // Writing: the drafts as context (a reviewer accepts them in review mode, where they are
    // listed with the other labels waiting).
    const drafts = reviewing() ? [] : feature.drafts;
    page.querySelector("[data-queue-drafts]").replaceChildren(...drafts.map((d) => labelRow(
      { ...d, author_kind: "automatic", tags: [] }, null)));
    page.querySelector("[data-queue-drafts-box]").hidden = drafts.length === 0;
  }

  const reviewing = () => form.elements.mode.value === "review";
  let pending = [];

  // Review mode: the labels of this feature someone else wrote that wait for a verdict.
  async function showPending() {
    const { data } = await api(`${saeApi}/features/${current}/labels`);
    pending = (data?.data ?? []).filter((l) => l.status === "needs_review"
      || (l.author_kind === "automatic" && l.status === "draft"));
    const list = page.querySelector("[data-queue-pending]");
    list.replaceChildren(...pending.map((l) => labelRow(l, null, onReview)));
    return pending.length;
  }

  async function onReview(label, verdict) {
    const { res, data } = await review(`${saeApi}/features/${current}`, label, verdict);
    if (!res.ok) {
      status.textContent = res.status === 412 ? "changed meanwhile: reloaded, review it again" : errorText(res, data);
      await showPending();
      return;
    }
    saved += 1;
    counter.textContent = String(saved);
    if (await showPending()) page.querySelector("[data-queue-pending] button")?.focus();
    else await next();
  }

  async function next() {
    status.textContent = "…";
    const { res, data } = await api(`${saeApi}/queue/next?${options()}`, { method: "POST" });
    if (res.status === 204) {
      current = null;
      card.hidden = true;
      done.hidden = false;
      status.textContent = "";
      return;
    }
    if (!res.ok) {
      status.textContent = errorText(res, data);
      return;
    }
    current = data.index;
    const feature = await api(`${saeApi}/features/${current}`);
    showFeature(current, feature.data);
    form.elements.description.value = "";
    form.elements.tags.value = "";
    page.querySelector("[data-queue-write]").hidden = reviewing();
    page.querySelector("[data-queue-review]").hidden = !reviewing();
    card.hidden = false;
    done.hidden = true;
    status.textContent = "";
    if (reviewing()) {
      await showPending();
      page.querySelector("[data-queue-pending] button")?.focus();
    } else {
      form.elements.description.focus();
    }
  }

  async function save() {
    if (current === null) return;
    const body = {
      description: form.elements.description.value.trim(),
      tags: form.elements.tags.value.split(/[\s,]+/).filter((t) => t),
      status: form.elements.status.value,
    };
    if (!body.description) {
      status.textContent = "type a description first (Esc skips)";
      return;
    }
    const { res, data } = await api(`${saeApi}/features/${current}/label`, {
      method: "PUT", body, headers: { "If-None-Match": "*" },
    });
    if (!res.ok) {
      status.textContent = errorText(res, data);
      return;
    }
    saved += 1;
    counter.textContent = String(saved);
    await next();
  }

  async function skip() {
    if (current === null) return;
    await api(`${saeApi}/queue/${current}/skip`, { method: "POST" });
    await next();
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!reviewing()) save();
  });
  form.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && ev.target.matches("input[name=description], input[name=tags]")) {
      ev.preventDefault();
      save();
    } else if (ev.key === "Enter" && reviewing() && !ev.target.matches("button, select, input")) {
      ev.preventDefault();
      if (pending.length) onReview(pending[0], "accepted");
    } else if (ev.key === "Escape") {
      ev.preventDefault();
      ev.stopPropagation();
      skip();
    }
  });
  for (const name of ["order", "mode"]) form.elements[name].addEventListener("change", next);
  next();
}
