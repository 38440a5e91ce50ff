"""The page the reading service shows at ``/``: drop or choose an image, see the reading.

One self-contained HTML document (no external script, style or font), posting the file
to ``/predict?chars=1`` exactly as any client would.  The reading lands in
``#reading`` (``data-text`` holds the text), an error in ``#error``.  A page address
ending in ``#image=data:image/png;base64,...`` reads that image at load time, through
the same code path as a dropped file: the headless-browser test drives the page so.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>xpnet reader</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; cursor: pointer; }
  #drop.over { background: #eef5ff; border-color: #36c; }
  #preview { max-width: 100%; margin-top: 1rem; image-rendering: pixelated; }
  #reading { font-size: 2rem; font-family: monospace; letter-spacing: 0.2em; margin: 1rem 0 0.2rem; }
  #chars span { display: inline-block; margin-right: 0.6rem; font-family: monospace; }
  #error { color: #b00; }
  .muted { color: #666; font-size: 0.9rem; }
</style>
</head>
<body>
<h1>xpnet reader</h1>
<p class="muted">Drop a CAPTCHA image below, or click to choose one. It is sent to
<code>POST /predict</code>; the reading and its confidence appear here.</p>
<p><label>Model <select id="model"></select></label></p>
<div id="drop">Drop an image here, or click to choose a file
  <input id="file" type="file" accept="image/*" hidden></div>
<img id="preview" alt="">
<div id="reading" data-text=""></div>
<div id="confidence" class="muted"></div>
<div id="chars"></div>
<div id="error" role="alert"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

async function loadModels() {
  try {
    const reply = await fetch("models");
    const models = (await reply.json()).models;
    for (const m of models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.name + " (" + m.length + " of " + m.charset + ")";
      $("model").appendChild(option);
    }
  } catch (err) {
    $("error").textContent = "Cannot list the models: " + err;
  }
}

async function readImage(blob) {
  $("error").textContent = "";
  $("reading").textContent = "...";
  $("reading").dataset.text = "";
  $("confidence").textContent = "";
  $("chars").textContent = "";
  $("preview").src = URL.createObjectURL(blob);
  const model = $("model").value;
  const url = "predict?chars=1" + (model ? "&model=" + encodeURIComponent(model) : "");
  try {
    const reply = await fetch(url, {method: "POST", body: blob,
                                    headers: {"Content-Type": blob.type || "application/octet-stream"}});
    const answer = await reply.json();
    if (!reply.ok) {
      $("reading").textContent = "";
      $("error").textContent = answer.error || ("HTTP " + reply.status);
      return;
    }
    $("reading").textContent = answer.text;
    $("reading").dataset.text = answer.text;
    $("confidence").textContent = "confidence " + answer.confidence.toFixed(3) + " (model " + answer.model + ")";
    for (const c of answer.chars) {
      const span = document.createElement("span");
      span.textContent = c.char + " " + c.confidence.toFixed(2);
      $("chars").appendChild(span);
    }
  } catch (err) {
    $("reading").textContent = "";
    $("error").textContent = "The service did not answer: " + err;
  }
}

const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
$("file").addEventListener("change", () => { if ($("file").files.length) readImage($("file").files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) readImage(e.dataTransfer.files[0]);
});

loadModels().then(async () => {
  const hash = location.hash;
  if (hash.startsWith("#image=data:")) {
    const blob = await (await fetch(hash.slice("#image=".length))).blob();
    await readImage(blob);
  }
});
</script>
</body>
</html>
"""

__all__ = ["PAGE"]
