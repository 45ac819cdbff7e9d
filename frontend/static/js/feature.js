// Feature page: the activation histogram and the "test this feature on your text" box.

import { activationHistogram } from "./plots.js";
import { fmtNum, onSubmitOrCtrlEnter, postJSON, renderTokens } from "./tokens.js";

const hist = document.getElementById("act-hist");
const histData = document.getElementById("act-hist-data");
if (hist && histData) activationHistogram(hist, JSON.parse(histData.textContent));

const box = document.querySelector("[data-test-box]");
if (box) {
  const form = box.querySelector("form");
  const textarea = form.querySelector("textarea");
  const status = box.querySelector(".test-status");
  const result = box.querySelector(".test-result");
  const button = form.querySelector("button");
  const featureMax = Number(box.dataset.max) || 0;

  async function run() {
    const text = textarea.value;
    if (!text.trim()) return;
    button.disabled = true;
    status.classList.remove("error");
    status.textContent = "running…";
    try {
      const data = await postJSON(box.dataset.api, { text });
      // BOS and other special tokens are shown but not shaded: their values are not comparable.
      const values = data.values.map((v, i) => (data.special[i] ? 0 : v));
      const maxHere = data.maxValue;
      // Shade against the feature's corpus max so weak activations look weak.
      const spans = renderTokens(result, data.tokens, values, {
        max: Math.max(featureMax, maxHere),
        maxIndex: maxHere > 0 ? data.maxValueTokenIndex : -1,
      });
      spans.forEach((span, i) => {
        if (data.special[i]) {
          span.classList.add("special");
          span.dataset.v = fmtNum(data.values[i]);
        }
      });
      result.hidden = false;
      const active = values.filter((v) => v > 0).length;
      status.textContent = `max ${fmtNum(maxHere)} · active on ${active} of ${values.length} tokens`;
    } catch (err) {
      status.classList.add("error");
      status.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  }

  onSubmitOrCtrlEnter(form, textarea, run);
}
