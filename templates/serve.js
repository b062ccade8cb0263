// batchcam serve: send each chosen or dropped file to POST api/predict and show its result.
// Every value from the server or a file name goes into the page as text (textContent), never as markup.
"use strict";

const page = { maxUploadBytes: null, queue: [], busy: false };
const BUSY_RETRIES = 10;  // a busy server (HTTP 503) is asked again after its Retry-After, this many times

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("file-input");
  const zone = document.getElementById("drop-zone");
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    addFiles(event.dataTransfer.files);
  });
  document.getElementById("clear-results").addEventListener("click", clearResults);
  loadModelInfo();
});

async function loadModelInfo() {
  const info = document.getElementById("model-info");
  try {
    const response = await fetch("healthz");
    const health = await response.json();
    const model = health.model;
    page.maxUploadBytes = health.max_upload_bytes;
    info.textContent = `Model ${model.name} (sha256 ${model.sha256.slice(0, 12)}…, classes ${model.classes.join(", ")}), `
      + `${model.cam.method} on ${model.cam.target_layer}, running on ${health.device}.`;
    document.getElementById("demo-notice").hidden = !model.demo;
    const pixels = uploadPixelLimit(health.max_pixels_per_request);
    document.getElementById("upload-limit").textContent =
      `; up to ${formatMegabytes(page.maxUploadBytes)}${pixels ? ` and ${pixels}` : ""} per file`;
  } catch (error) {
    info.textContent = `The server did not describe its model (${error.message}).`;
  }
}

function addFiles(files) {
  for (const file of files) {
    const card = newCard(file.name);
    document.getElementById("results").append(card);
    page.queue.push({ file, card });
  }
  document.getElementById("toolbar").hidden = false;
  drainQueue();
}

// One request at a time: the model runs one batch at a time anyway, and results arrive in order.
async function drainQueue() {
  if (page.busy) return;
  page.busy = true;
  while (page.queue.length) {
    const { file, card } = page.queue.shift();
    await predict(file, card);
  }
  page.busy = false;
}

async function predict(file, card) {
  if (page.maxUploadBytes !== null && file.size > page.maxUploadBytes) {
    showError(card, `${formatMegabytes(file.size)} is larger than the ${formatMegabytes(page.maxUploadBytes)} upload limit`);
    return;
  }
  const form = new FormData();
  form.append("files", file, file.name);
  try {
    let response = await fetch("api/predict", { method: "POST", body: form });
    for (let retry = 1; response.status === 503 && retry <= BUSY_RETRIES; retry++) {
      const seconds = Math.max(1, Number(response.headers.get("Retry-After")) || 2);
      card.querySelector(".status-text").textContent = `Server busy; trying again in ${seconds} s`;
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      card.querySelector(".status-text").textContent = "Working…";
      response = await fetch("api/predict", { method: "POST", body: form });
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      showError(card, body.detail ? String(body.detail) : `the server answered HTTP ${response.status}`);
      return;
    }
    const result = body.results[0];
    if (result.status === "skipped") showSkipped(card, result.error);
    else showResult(card, result);
  } catch (error) {
    showError(card, `the server did not answer (${error.message})`);
  }
}

function newCard(name) {
  const card = document.getElementById("card-template").content.firstElementChild.cloneNode(true);
  card.querySelector(".file-name").textContent = name;
  return card;
}

function showError(card, reason) {
  card.dataset.status = "error";
  card.querySelector(".status-text").textContent = "Not processed";
  const text = card.querySelector(".error-text");
  text.textContent = reason;
  text.hidden = false;
}

/** A file read but not scored (a DICOM that is not a frontal chest radiograph): its reason. */
function showSkipped(card, reason) {
  card.dataset.status = "skipped";
  card.querySelector(".status-text").textContent = "Not scored";
  const text = card.querySelector(".error-text");
  text.textContent = `skipped: ${reason}`;
  text.hidden = false;
}

function showResult(card, result) {
  const image = card.querySelector(".result-image");
  const toggle = card.querySelector(".toggle");
  const caption = card.querySelector(".caption");
  const download = card.querySelector(".download");

  card.querySelector(".prediction").textContent = result.prediction;
  setBar(card.querySelector(".confidence-fill"), result.confidence);
  card.querySelector(".confidence-text").textContent = `${formatPercent(result.confidence)} confidence`;
  fillProbabilities(card.querySelector(".probabilities tbody"), result.probabilities);
  card.querySelector(".facts").textContent = `${result.width} × ${result.height} px; the heatmap explains `
    + `${result.cam_target}, hottest at (${result.cam_peak_x}, ${result.cam_peak_y}).`
    + (result.ood_flag ? " Unlike the training images: do not trust this prediction or its heatmap." : "");

  image.src = result.overlay;
  image.alt = `Grad-CAM overlay for ${result.file}`;
  download.href = result.overlay;
  download.download = `${stem(result.file)}.overlay.jpg`;
  toggle.addEventListener("click", () => {
    const showOriginal = card.dataset.showing === "overlay";
    card.dataset.showing = showOriginal ? "original" : "overlay";
    image.src = showOriginal ? result.original : result.overlay;
    image.alt = `${showOriginal ? "Original X-ray" : "Grad-CAM overlay"} for ${result.file}`;
    caption.textContent = showOriginal ? "Original X-ray" : "Grad-CAM overlay";
    toggle.textContent = showOriginal ? "Show overlay" : "Show original";
  });

  card.querySelector(".status-text").textContent = "Done";
  card.querySelector(".card-body").hidden = false;
  card.dataset.status = "done";
}

function fillProbabilities(tbody, probabilities) {
  const template = document.getElementById("probability-row-template");
  for (const [name, value] of Object.entries(probabilities)) {
    const row = template.content.firstElementChild.cloneNode(true);
    row.querySelector(".class-name").textContent = name;
    setBar(row.querySelector(".bar-fill"), value);
    row.querySelector(".class-value").textContent = formatPercent(value);
    tbody.append(row);
  }
}

function clearResults() {
  page.queue.length = 0;
  document.getElementById("results").replaceChildren();
  document.getElementById("toolbar").hidden = true;
}

function setBar(fill, fraction) {
  fill.style.width = `${Math.max(0, Math.min(1, fraction)) * 100}%`;
}

function formatPercent(fraction) {
  return `${(fraction * 100).toFixed(1)} %`;
}

// 16-bit, float and DICOM images decode through 64-bit floats: the server allows them a quarter of the pixels.
function uploadPixelLimit(pixels) {
  if (typeof pixels !== "number") return "";
  const megapixels = (value) => `${Number((value / 1e6).toFixed(2))}`;
  return `${megapixels(pixels)} megapixels (${megapixels(pixels / 4)} for 16-bit, float and DICOM images)`;
}

function formatMegabytes(bytes) {
  return `${(bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 0)} MB`;
}

function stem(name) {
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(0, dot) : name;
}
