"""GET /: one page to try the model — choose an image, ask a question, see the top-5 answers and the latency."""
from __future__ import annotations

import html

# The base every page of the server shares; each page adds its title, style and body.
_DOCUMENT = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 2rem auto; padding: 0 1rem; color: #222; }
 .error { color: #b00020; } #latency { color: #555; margin-top: .5rem; }
__STYLE__</style>
</head>
<body>
__BODY__</body>
</html>
"""


def document(title: str, style: str, body: str) -> str:
    """A whole page from its title, its own style rules and its body (placeholders are the caller's to fill)."""
    return _DOCUMENT.replace("__TITLE__", title).replace("__STYLE__", style).replace("__BODY__", body)


_TITLE = "Ask — __MODEL__"
_STYLE = """ body { max-width: 44rem; }
 form { display: grid; gap: .6rem; }
 input[type=text] { padding: .4rem; font-size: 1rem; }
 button { padding: .45rem 1.2rem; font-size: 1rem; width: max-content; }
 #preview { max-width: 16rem; max-height: 16rem; display: none; margin-top: .5rem; }
 .row { display: grid; grid-template-columns: 9rem 1fr 4rem; gap: .5rem; align-items: center; margin: .25rem 0; }
 .bar { background: #e6e6e6; height: 1rem; } .fill { background: #3b7dd8; height: 100%; }
"""
_BODY = """<h1>Ask the model</h1>
<p>Model <code>__MODEL__</code>. __NOTE__</p>
<form id="ask">
 <input type="file" id="image" name="image" accept="image/*" required>
 <img id="preview" alt="">
 <input type="text" id="question" name="question" placeholder="What is in the picture?" required>
 <button type="submit" id="submit">Ask</button>
</form>
<div id="answers" aria-live="polite"></div>
<div id="latency"></div>
<script>
const form = document.getElementById("ask"), answers = document.getElementById("answers"),
      latency = document.getElementById("latency"), image = document.getElementById("image"),
      preview = document.getElementById("preview");
image.addEventListener("change", () => {
  if (image.files.length) { preview.src = URL.createObjectURL(image.files[0]); preview.style.display = "block"; }
});
function row(item) {
  const div = document.createElement("div"); div.className = "row answer";
  const name = document.createElement("span"); name.className = "name"; name.textContent = item.answer;
  const bar = document.createElement("div"); bar.className = "bar";
  const fill = document.createElement("div"); fill.className = "fill";
  fill.style.width = (100 * item.probability).toFixed(1) + "%"; bar.appendChild(fill);
  const pct = document.createElement("span"); pct.className = "probability";
  pct.textContent = (100 * item.probability).toFixed(1) + "%";
  div.append(name, bar, pct); return div;
}
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  answers.textContent = "…"; latency.textContent = "";
  const body = new FormData();
  body.append("image", image.files[0]);
  body.append("question", document.getElementById("question").value);
  body.append("top_k", "5");
  const began = performance.now();
  try {
    const response = await fetch("/v1/vqa", { method: "POST", body });
    const result = await response.json();
    answers.textContent = "";
    if (!response.ok) { answers.innerHTML = '<p class="error"></p>'; answers.firstChild.textContent = result.error; return; }
    result.top_k.forEach(item => answers.appendChild(row(item)));
    latency.textContent = "server " + result.latency_ms.toFixed(1) + " ms, round trip " +
      (performance.now() - began).toFixed(1) + " ms" + (result.warning ? " — " + result.warning : "");
  } catch (err) {
    answers.innerHTML = '<p class="error"></p>'; answers.firstChild.textContent = String(err);
  }
});
</script>
"""



def page_html(model_id: str, has_vqa: bool, has_search: bool = False) -> str:
    note = ("Choose an image and type a question: the five most likely answers appear with their probabilities."
            if has_vqa else "This checkpoint has no VQA head: use the API endpoints listed by /v1/models.")
    link = ' <a href="/search">Search the indexed images.</a>' if has_search else ""
    return document(_TITLE, _STYLE, _BODY).replace("__MODEL__", html.escape(model_id)).replace("__NOTE__", html.escape(note) + link)
