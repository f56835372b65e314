// The sdaot web page: fills the form from /v1/models, /v1/samplers and /v1/style-presets, queues a job
// (POST /v1/jobs), follows its Server-Sent Events for the progress bar and the live preview, shows the images,
// cancels on request.
// Plain browser JavaScript: no build step. fetch() reads the event stream because EventSource cannot send
// the Authorization header. URLs are relative, so the page works under any path prefix (--root-path), and
// text from the server or the user only ever goes into textContent: the page's CSP allows no inline script.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "sdaot-api-key";
const SIZES = ["64x64", "128x128", "256x256", "512x512", "512x768", "768x512", "768x768", "1024x1024"];
let models = [];
let current = null;  // {id, controller}

function headers(json) {
  const h = {};
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function say(text, isError) {
  $("message").textContent = text || "";
  $("message").style.color = isError ? "#b00020" : "#333";
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(Boolean(options.body)) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const where = body.param ? ` (${body.param})` : "";
    throw new Error(`${response.status}: ${body.message || response.statusText}${where}`);
  }
  return body;
}

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = label || value;
  select.appendChild(o);
}

function fillModel() {
  const model = models.find((m) => m.name === $("model").value);
  if (!model) return;
  const compiled = new Set(model.compiled_resolutions.tvm);
  const sizes = [...new Set([...compiled, model.native_resolution, ...SIZES])];
  $("size").replaceChildren();
  for (const size of sizes) {
    const marks = [compiled.has(size) ? "compiled" : "", size === model.native_resolution ? "native" : ""];
    const note = marks.filter(Boolean).join(", ");
    option($("size"), size, note ? `${size} (${note})` : size);
  }
  $("size").value = model.native_resolution;
  $("steps").value = model.default_steps;
  $("cfg-scale").value = model.default_cfg_scale;
  $("sampler").value = model.default_sampler;
  const loras = $("loras");
  loras.replaceChildren(Object.assign(document.createElement("legend"), { textContent: "LoRA" }));
  if (!model.loras.length) {
    loras.appendChild(Object.assign(document.createElement("span"), {
      className: "hint", textContent: "none in this server's LoRA folder" }));
  }
  for (const name of model.loras) {
    const box = Object.assign(document.createElement("input"), { type: "checkbox", value: name });
    box.dataset.lora = "";
    const weight = Object.assign(document.createElement("input"), {
      type: "number", min: "-2", max: "2", step: "0.1", value: "0.8" });
    weight.dataset.weight = "";
    const span = document.createElement("span");
    span.append(box, ` ${name}`);
    const label = document.createElement("label");
    label.append(span, weight);
    loras.appendChild(label);
  }
}

async function load() {
  $("api-key").value = sessionStorage.getItem(KEY) || "";
  try {
    const [modelList, samplers, presets] = await Promise.all(
      [api("v1/models"), api("v1/samplers"), api("v1/style-presets")]);
    models = modelList.data;
    $("model").replaceChildren();
    for (const m of models) option($("model"), m.name, `${m.name} (${m.weights})`);
    $("sampler").replaceChildren();
    for (const s of samplers.data) option($("sampler"), s.name);
    for (const p of presets.data) option($("style-preset"), p.name);
    fillModel();
    say(models.length ? "" : "no models are loaded yet; reload in a moment");
  } catch (err) {
    say(`cannot list models: ${err.message}`, true);
  }
}

function requestBody() {
  const [width, height] = $("size").value.split("x").map(Number);
  const body = {
    model_name: $("model").value, prompt: $("prompt").value, width, height,
    steps: Number($("steps").value), cfg_scale: Number($("cfg-scale").value), sampler: $("sampler").value,
    num_images: Number($("num-images").value), backend: $("backend").value, vae: $("vae").value,
    deepcache_interval: Number($("deepcache-interval").value), preview_every: Number($("preview-every").value),
  };
  if ($("negative-prompt").value) body.negative_prompt = $("negative-prompt").value;
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("style-preset").value) body.style_preset = $("style-preset").value;
  const loras = {};
  for (const label of $("loras").querySelectorAll("label")) {
    const box = label.querySelector("[data-lora]");
    if (box.checked) loras[box.value] = Number(label.querySelector("[data-weight]").value);
  }
  if (Object.keys(loras).length) body.loras = loras;
  return body;
}

function showProgress(state) {
  const steps = state.steps || 0;
  const step = state.step || 0;
  $("progress").value = steps ? Math.round((100 * step) / steps) : 0;
  let text = state.status;
  if (state.status === "queued") text = `queued (${state.queue_position} ahead)`;
  if (state.status === "running" || state.status === "succeeded") {
    text = `${state.status}: step ${step}/${steps}`;
    if (state.eta != null) text += `, about ${state.eta.toFixed(1)} s left`;
  }
  $("progress-text").textContent = text;
}

function showPreview(preview) {
  $("preview").src = `data:image/webp;base64,${preview.image}`;
  $("preview").title = `step ${preview.step}/${preview.steps}`;
  $("preview").hidden = false;
}

function showResult(result) {
  for (const image of result.images) {
    const src = `data:image/${result.output_format};base64,${image.image}`;
    const img = Object.assign(document.createElement("img"), { alt: "generated image", src });
    const seed = Object.assign(document.createElement("span"), { textContent: `seed ${image.random_seed}` });
    const link = Object.assign(document.createElement("a"), {
      href: src, download: `sdaot-${image.random_seed}.${result.output_format}`, textContent: "download" });
    const caption = document.createElement("figcaption");
    caption.append(seed, " ", link);
    const figure = document.createElement("figure");
    figure.append(img, caption);
    $("results").prepend(figure);
  }
}

async function follow(id, controller) {
  const response = await fetch(`v1/jobs/${encodeURIComponent(id)}/events`, { headers: headers(false), signal: controller.signal });
  if (!response.ok) throw new Error(`events: HTTP ${response.status}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
      if (name === "preview") {
        showPreview(data);
        continue;
      }
      showProgress(data);
      if (name === "result") return data;
    }
  }
}

async function generate(event) {
  event.preventDefault();
  say("");
  $("generate").disabled = true;
  try {
    const job = await api("v1/jobs", { method: "POST", body: JSON.stringify(requestBody()) });
    current = { id: job.id, controller: new AbortController() };
    $("progress-area").dataset.job = job.id;
    $("preview").hidden = true;
    $("cancel").disabled = false;
    showProgress(job);
    const final = await follow(job.id, current.controller);
    if (final && final.status === "succeeded") {
      $("preview").hidden = true;
      showResult(final.result);
    }
    if (final && final.status === "failed") say(`failed: ${final.error.message}`, true);
    if (final && final.status === "cancelled") say("cancelled");
  } catch (err) {
    say(err.message, true);
  } finally {
    $("generate").disabled = false;
    $("cancel").disabled = true;
    current = null;
  }
}

async function cancel() {
  if (!current) return;
  try {
    await api(`v1/jobs/${encodeURIComponent(current.id)}`, { method: "DELETE" });
  } catch (err) {
    say(err.message, true);
  }
}

$("save-key").addEventListener("click", () => {
  sessionStorage.setItem(KEY, $("api-key").value);
  load();
});
$("model").addEventListener("change", fillModel);
$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
load();
