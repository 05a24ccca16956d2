"""The page `aml serve` answers at /: pick a photo, see the top hits as thumbnails with their scores."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>aml serve</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 70em; }
#hits { display: flex; flex-wrap: wrap; gap: .8em; margin-top: 1em; }
figure { margin: 0; width: 10em; } figure img { width: 10em; height: 10em; object-fit: cover; background: #eee; }
figcaption { font-size: .8em; overflow-wrap: anywhere; } #error { color: #b00; } #info { color: #555; }
</style></head>
<body>
<h1>aml serve</h1>
<p id="info">loading the index description...</p>
<form id="form">
  <label>API key <input id="key" type="password" size="24" placeholder="(when the server has keys)"></label>
  <label>encoder <select id="encoder"></select></label>
  <label>top <input id="k" type="number" value="12" min="1" max="100" style="width:4em"></label><br><br>
  <input id="photo" type="file" accept="image/*"> <button type="submit">Search</button>
</form>
<p id="error"></p>
<div id="hits"></div>
<script>
const $ = (id) => document.getElementById(id);
$("key").value = localStorage.getItem("aml-key") || "";
let root = null;
function headers() {
  const key = $("key").value.trim();
  localStorage.setItem("aml-key", key);
  return key ? {"Authorization": "Bearer " + key} : {};
}
async function call(url, options) {
  const r = await fetch(url, {...options, headers: headers()});
  if (!r.ok) {
    let reason = r.statusText;
    try { reason = (await r.json()).error; } catch (e) {}
    throw new Error(r.status + ": " + reason);
  }
  return r;
}
async function loadInfo() {
  try {
    const info = await (await call("/info")).json();
    root = info.image_root;
    $("info").textContent = info.count + " images, " + info.describe + ", generation " + info.generation;
    $("encoder").replaceChildren(...info.encoders.map((e) => new Option(e, e)));
    $("error").textContent = info.encoders.length ? "" : "this server has no --encoder to embed photos with";
  } catch (e) { $("info").textContent = ""; $("error").textContent = e.message; }
}
async function thumb(name, score) {
  const fig = document.createElement("figure"), img = document.createElement("img");
  const cap = document.createElement("figcaption");
  cap.textContent = score.toFixed(4) + " " + name.split("/").pop();
  fig.append(img, cap);
  if (root && name.startsWith(root + "/")) {
    const rel = name.slice(root.length + 1).split("/").map(encodeURIComponent).join("/");
    call("/images/" + rel).then(async (r) => { img.src = URL.createObjectURL(await r.blob()); }).catch(() => {});
  }
  return fig;
}
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").textContent = "";
  const file = $("photo").files[0];
  if (!file) { $("error").textContent = "pick a photo first"; return; }
  const body = new FormData();
  body.append("image", file); body.append("encoder", $("encoder").value); body.append("k", $("k").value);
  try {
    const res = await (await call("/search/image", {method: "POST", body})).json();
    $("hits").replaceChildren(...await Promise.all(res.results[0].map((h) => thumb(h.name, h.score))));
  } catch (e) { $("error").textContent = e.message; }
});
$("key").addEventListener("change", loadInfo);
loadInfo();
</script>
</body></html>
"""
