// SAE overview: the histograms are drawn by app.js; here, the jump box accepts Enter directly.

for (const form of document.querySelectorAll("form.jump")) {
  form.addEventListener("submit", (ev) => {
    const input = form.querySelector("input");
    if (!input.value) ev.preventDefault();
  });
}
