// The labeling queue: type a description, Enter saves and moves on, Esc skips. The server
// leases each feature to one person for a few minutes (POST .../queue/next).

import { api, el, errorText } from "./labels.js";
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
    page.querySelector("[data-queue-existing]").textContent = label ? `shown now: ${label.description}` : "";
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
    card.hidden = false;
    done.hidden = true;
    status.textContent = "";
    form.elements.description.focus();
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
    save();
  });
  form.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && ev.target.matches("input[name=description], input[name=tags]")) {
      ev.preventDefault();
      save();
    } else if (ev.key === "Escape") {
      ev.preventDefault();
      ev.stopPropagation();
      skip();
    }
  });
  for (const name of ["order", "mode"]) form.elements[name].addEventListener("change", next);
  next();
}
