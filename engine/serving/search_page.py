"""GET /search: type a query (or choose a query image), see the index's best images as thumbnails, best first."""
from __future__ import annotations

import html

from .page import document

_TITLE = "Search — __MODEL__"
_STYLE = """ body { max-width: 64rem; }
 form { display: flex; flex-wrap: wrap; gap: .6rem; align-items: center; }
 #query { flex: 1 1 20rem; padding: .4rem; font-size: 1rem; }
 button { padding: .45rem 1.2rem; font-size: 1rem; }
 #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr)); gap: 1rem; margin-top: 1rem; }
 figure { margin: 0; } figure img { width: 100%; height: 12rem; object-fit: cover; background: #eee; }
 figcaption { font-size: .8rem; word-break: break-all; } .score { font-weight: 600; margin-right: .4rem; }
"""
_BODY = """<h1>Search the images</h1>
<p>Model <code>__MODEL__</code>, __COUNT__ images. Type what you are looking for, or choose an image to find
similar ones.</p>
<form id="search">
 <input type="text" id="query" placeholder="a dog running on a beach">
 <input type="file" id="image" accept="image/*">
 <label>top <input type="number" id="top_k" min="1" max="100" value="12" style="width: 4rem"></label>
 <button type="submit" id="submit">Search</button>
</form>
<div id="latency"></div>
<div id="results" aria-live="polite"></div>
<script>
const form = document.getElementById("search"), results = document.getElementById("results"),
      latency = document.getElementById("latency"), image = document.getElementById("image");
function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
function figure(item) {
  const fig = document.createElement("figure"); fig.className = "result"; fig.dataset.id = item.id;
  const img = document.createElement("img"); img.src = "/v1/images/" + item.id + "?max_side=384";
  img.alt = item.path; img.loading = "lazy";
  const link = document.createElement("a"); link.href = "/v1/images/" + item.id; link.appendChild(img);
  const caption = document.createElement("figcaption");
  const score = document.createElement("span"); score.className = "score"; score.textContent = item.score.toFixed(4);
  const path = document.createElement("span"); path.className = "path"; path.textContent = item.path;
  caption.append(score, path); fig.append(link, caption);
  return fig;
}
function fail(message) {
  results.innerHTML = '<p class="error"></p>'; results.firstChild.textContent = message;
}
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  results.textContent = "…"; latency.textContent = "";
  const query = document.getElementById("query").value, top_k = parseInt(document.getElementById("top_k").value, 10);
  const began = performance.now();
  try {
    const body = image.files.length ? { image: await base64(image.files[0]), top_k } : { text: query, top_k };
    const response = await fetch("/v1/search", { method: "POST", headers: { "content-type": "application/json" },
                                                 body: JSON.stringify(body) });
    const result = await response.json();
    if (!response.ok) { fail(result.error); return; }
    results.textContent = "";
    result.results.forEach(item => results.appendChild(figure(item)));
    latency.textContent = result.results.length + " images; server " + result.latency_ms.toFixed(1) +
      " ms, round trip " + (performance.now() - began).toFixed(1) + " ms" + (result.warning ? " — " + result.warning : "");
  } catch (err) {
    fail(String(err));
  }
});
</script>
"""



def search_page_html(model_id: str, images: int) -> str:
    return document(_TITLE, _STYLE, _BODY).replace("__MODEL__", html.escape(model_id)).replace("__COUNT__", str(images))
