// The c2p-serve viewer: upload or open a job, follow it, show the overlay slice by slice with its reliability.
// It uses the public REST API only, so it shows exactly what any client gets. Nothing is logged to the console.
// Where the service wants credentials, every request carries the key or token typed in the Access field as
// `Authorization: Bearer ...`; it is kept in sessionStorage (this tab only), never in a URL, the DOM or a log.

const API = "/v1/segmentations";
const POLL_MS = 500;
const WHEEL_STEP = 60; // pixels of wheel travel per slice, so a trackpad does not race through a volume
const OVERLAYS_KEPT = 8; // slice PNGs kept as object URLs: the current one, its neighbours, a few just seen
const KEY_ITEM = "c2p-serve.key"; // the sessionStorage item holding the key or token

const $ = (id) => document.getElementById(id);
const el = {
  keyForm: $("key-form"), key: $("key"), keyNote: $("key-note"),
  uploadForm: $("upload-form"), file: $("file"), modality: $("modality"), submit: $("submit"),
  openForm: $("open-form"), jobId: $("job-id"), open: $("open"),
  status: $("status"), currentJob: $("current-job"),
  error: $("error"), errorCode: $("error-code"), errorMessage: $("error-message"),
  report: $("report"), score: $("score"), level: $("level"), suppressedNote: $("suppressed-note"),
  concept: $("concept"), intendedUse: $("intended-use"),
  model: $("model"), input: $("input"), inputModality: $("input-modality"), outliers: $("outliers"),
  timings: $("timings"),
  downloads: { json: $("download-json"), nifti: $("download-nifti"), "dicom-seg": $("download-dicom-seg") },
  stage: $("stage"), placeholder: $("placeholder"), overlay: $("overlay"), imageError: $("image-error"),
  sliceBar: $("slice-bar"), nav: $("nav"), prev: $("prev"), next: $("next"), slice: $("slice"),
  marks: $("slice-marks"), sliceLabel: $("slice-label"), sliceScore: $("slice-score"), sliceLevel: $("slice-level"),
  sliceFlags: $("slice-flags"),
};

/** An error answer of the API ({code, message}), or a failure to reach it at all. */
class ApiError extends Error {
  constructor(code, message, status = 0) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

// What is on screen. `generation` changes whenever another job is opened, so a stale poll stops by itself.
// `retry` is what to do again once a key is entered, after the service asked for one.
const view = { generation: 0, job: null, count: 0, index: 0, slices: new Map(), wheel: 0, retry: null };

/** A request to the API with the key, if one is set; the response when it is 2xx, else an ApiError. */
async function request(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = el.key.value.trim();
  if (key) {
    try {
      headers.set("Authorization", `Bearer ${key}`);
    } catch {
      throw new ApiError("invalid_key", "The key or token holds characters no header can carry.", 401);
    }
  }
  let response;
  try {
    response = await fetch(path, { cache: "no-store", ...init, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("network", "The service could not be reached.");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    const code = body?.code ?? `http_${response.status}`;
    const message = body?.message ?? (response.statusText || "The request failed.");
    throw new ApiError(code, message, response.status);
  }
  if (key) keyAccepted();
  return response;
}

async function api(path, init) {
  const response = await request(path, init);
  const body = await response.json().catch(() => null);
  if (body === null) throw new ApiError("bad_response", "The service sent an answer this page cannot read.");
  return body;
}

function keyAccepted() {
  el.keyNote.hidden = true;
  el.key.removeAttribute("aria-invalid");
}

/** After a 401: say so beside the key field, put the cursor there, and remember what to try again. */
function askForKey(retry) {
  view.retry = retry;
  el.keyNote.hidden = false;
  el.key.setAttribute("aria-invalid", "true");
  el.key.focus();
}

const jobUrl = (id) => `${API}/${encodeURIComponent(id)}`;
const resultUrl = (id, format, slice) =>
  `${jobUrl(id)}/result?format=${format}` + (slice === undefined ? "" : `&slice=${slice}`);

function setStatus(status, text) {
  el.status.dataset.status = status;
  el.status.textContent = text;
}

function showError(code, message) {
  el.errorCode.textContent = code;
  el.errorMessage.textContent = message;
  el.error.hidden = false;
}

function clearView() {
  el.error.hidden = true;
  el.report.hidden = true;
  el.sliceBar.hidden = true;
  el.overlay.hidden = true;
  el.overlay.removeAttribute("src");
  delete el.overlay.dataset.slice;
  forgetOverlays();
  el.imageError.hidden = true;
  el.placeholder.hidden = false;
  el.stage.dataset.state = "empty";
  view.job = null;
  view.count = 0;
  view.slices = new Map();
  view.retry = null;
}

function rememberJob(id) {
  const url = new URL(window.location.href);
  url.searchParams.set("job", id);
  history.replaceState(null, "", url);
  el.jobId.value = id;
  el.currentJob.textContent = `Job ${id}`;
  el.currentJob.hidden = false;
}

// ---- following a job --------------------------------------------------------------------------------------

async function follow(id, first = null) {
  const generation = ++view.generation;
  clearView();
  rememberJob(id);
  let job = first;
  const started = performance.now();
  while (generation === view.generation) {
    try {
      job ??= await api(jobUrl(id));
    } catch (err) {
      if (generation !== view.generation) return;
      if (err.code === "network") {
        setStatus("retrying", "Connection lost; retrying…");
        await sleep(2000);
        continue;
      }
      setStatus("failed", "Could not open the job.");
      showError(err.code, err.message);
      if (err.status === 401) askForKey(() => follow(id));
      return;
    }
    if (generation !== view.generation) return;
    if (job.status === "succeeded") return showResult(job);
    if (job.status === "failed") {
      setStatus("failed", "Failed");
      showError(job.error?.code ?? "failed", job.error?.message ?? "The job failed.");
      return;
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(job.status, `${job.status === "running" ? "Running" : "Queued"}… ${seconds} s`);
    job = null;
    await sleep(POLL_MS);
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- the result -------------------------------------------------------------------------------------------

function showResult(job) {
  const result = job.result;
  const [count, rows, cols] = result.input.shape;
  const areas = new Map(result.mask.slices.map((s) => [s.index, s.area]));
  const reliability = new Map(result.reliability.slices.map((s) => [s.index, s]));
  view.job = job;
  view.count = count;
  view.slices = new Map();
  for (let k = 0; k < count; k++) view.slices.set(k, { area: areas.get(k) ?? 0, ...(reliability.get(k) ?? {}) });

  setStatus("succeeded", "Succeeded");
  showReport(job, rows, cols);

  el.slice.max = String(count - 1);
  el.nav.hidden = count < 2;
  drawMarks();
  el.sliceBar.hidden = false;
  el.placeholder.hidden = true;
  el.overlay.hidden = false;
  el.stage.dataset.state = "image";
  setSlice(largestSlice(), true);
}

function largestSlice() {
  let best = 0;
  let bestArea = -1;
  for (const [k, s] of view.slices) {
    if (s.area > bestArea) [best, bestArea] = [k, s.area];
  }
  return best;
}

function showReport(job, rows, cols) {
  const { model, input, reliability, timings } = job.result;
  el.score.textContent = reliability.score.toFixed(3);
  setLevel(el.level, reliability.level);
  el.suppressedNote.hidden = !reliability.suppressed;
  el.suppressedNote.textContent = reliability.reason === "blank_input"
    ? "The input has no content: nothing to segment, the model was not asked."
    : "Every slice was gated: the result is empty.";
  const concept = job.result.concept;
  el.concept.textContent = concept
    ? `${concept.name} (${concept.code.scheme} ${concept.code.value} ${concept.code.meaning}; similarity ${concept.similarity.toFixed(2)})`
    : "not stated";
  el.intendedUse.textContent = job.result.intended_use ?? "";
  el.model.textContent = `${model.name} · ${model.version}`;
  const slices = input.shape[0] === 1 ? "1 slice" : `${input.shape[0]} slices`;
  el.input.textContent = `${input.format.toUpperCase()} · ${slices} of ${rows} × ${cols}`;
  el.inputModality.textContent = input.modality ?? "unknown";
  el.outliers.textContent = reliability.outlier_slices.length
    ? reliability.outlier_slices.map((k) => k + 1).join(", ")
    : "none";
  el.timings.textContent = [
    ["queue", timings.queue_ms], ["decode", timings.decode_ms],
    ["inference", timings.inference_ms], ["encode", timings.encode_ms],
  ].map(([name, ms]) => `${name} ${formatMs(ms)}`).join(" · ");
  for (const [format, link] of Object.entries(el.downloads)) {
    const available = format !== "dicom-seg" || input.format === "dicom";
    link.hidden = !available;
    link.href = resultUrl(job.id, format);
    link.download = `${job.id}.${{ json: "json", nifti: "nii.gz", "dicom-seg": "seg.dcm" }[format]}`;
  }
  el.report.hidden = false;
}

const formatMs = (ms) => (ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`);

function setLevel(node, level) {
  node.textContent = level ?? "–";
  node.dataset.level = level ?? "";
}

function drawMarks() {
  const marks = [];
  for (const [k, s] of view.slices) {
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.dataset.level = s.level ?? "";
    if (s.outlier) mark.classList.add("outlier");
    if (s.suppressed) mark.classList.add("suppressed");
    mark.dataset.index = String(k);
    const notes = [s.level, s.outlier && "outlier", s.suppressed && "suppressed"].filter(Boolean);
    mark.title = `Slice ${k + 1}${notes.length ? `: ${notes.join(", ")}` : ""}`;
    marks.push(mark);
  }
  el.marks.replaceChildren(...marks);
  el.marks.hidden = view.count < 2;
}

function setSlice(index, force = false) {
  if (!view.job) return;
  const k = Math.max(0, Math.min(view.count - 1, index));
  if (k === view.index && !force) return;
  view.index = k;
  el.slice.value = String(k);
  el.sliceLabel.textContent = `${k + 1} / ${view.count}`;
  el.sliceLabel.dataset.index = String(k);
  el.prev.disabled = k === 0;
  el.next.disabled = k === view.count - 1;
  for (const mark of el.marks.children) mark.classList.toggle("current", mark.dataset.index === String(k));

  const s = view.slices.get(k) ?? {};
  el.sliceScore.textContent = typeof s.score === "number" ? s.score.toFixed(3) : "–";
  setLevel(el.sliceLevel, s.level);
  const flags = [];
  if (s.outlier) flags.push(["outlier", "Outlier"]);
  if (s.suppressed) flags.push(["suppressed", "Suppressed"]);
  el.sliceFlags.replaceChildren(...flags.map(([kind, text]) => {
    const flag = document.createElement("span");
    flag.className = `flag ${kind}`;
    flag.textContent = text;
    return flag;
  }));

  el.imageError.hidden = true;
  showOverlay(k);
}

// ---- overlays ---------------------------------------------------------------------------------------------
// An <img src> cannot send the key, so each slice's PNG is fetched and shown through an object URL. The last
// OVERLAYS_KEPT stay (the neighbours fetched ahead make scrolling smooth); older ones are aborted or revoked,
// so memory stays flat however long a volume is scrolled.

const overlays = new Map(); // path -> { controller, url: Promise<object URL> }, least recently used first

function overlay(path) {
  let entry = overlays.get(path);
  if (entry) {
    overlays.delete(path); // set again below, as the most recently used
  } else {
    const controller = new AbortController();
    const url = request(path, { signal: controller.signal })
      .then((response) => response.blob())
      .then((blob) => URL.createObjectURL(blob));
    entry = { controller, url };
    url.catch(() => overlays.get(path) === entry && overlays.delete(path)); // a failure is asked again next time
  }
  overlays.set(path, entry);
  while (overlays.size > OVERLAYS_KEPT) forget(overlays.keys().next().value);
  return entry;
}

function forget(path) {
  const entry = overlays.get(path);
  overlays.delete(path);
  entry.controller.abort();
  entry.url.then((url) => URL.revokeObjectURL(url), () => {});
}

function forgetOverlays() {
  for (const path of [...overlays.keys()]) forget(path);
}

async function showOverlay(k) {
  const job = view.job;
  const path = resultUrl(job.id, "png", k);
  const entry = overlay(path);
  for (const near of [k - 1, k + 1]) {
    if (near >= 0 && near < view.count) overlay(resultUrl(job.id, "png", near));
  }
  const current = () => view.job === job && view.index === k;
  let url;
  try {
    url = await entry.url;
  } catch (err) {
    if (!current() || err.name === "AbortError") return;
    el.imageError.textContent = err.code ? `${err.code}: ${err.message}` : "The overlay could not be loaded.";
    el.imageError.hidden = false;
    if (err.status === 401) askForKey(() => setSlice(k, true));
    return;
  }
  if (!current() || overlays.get(path) !== entry) return; // moved on meanwhile, or that URL is revoked
  el.overlay.src = url;
  el.overlay.dataset.slice = String(k);
  el.overlay.alt = `Slice ${k + 1} of ${view.count} with the segmentation in red`;
}

el.overlay.addEventListener("error", () => {
  if (!el.overlay.getAttribute("src")) return;
  el.imageError.textContent = "The overlay could not be shown.";
  el.imageError.hidden = false;
});

// ---- downloads --------------------------------------------------------------------------------------------
// The links keep the API's address (to copy), but a click fetches with the key and saves through a blob URL.

async function download(link) {
  if (link.dataset.busy) return;
  link.dataset.busy = "true";
  view.retry = null;
  el.error.hidden = true;
  try {
    const blob = await (await request(link.getAttribute("href"))).blob();
    const url = URL.createObjectURL(blob);
    const save = document.createElement("a");
    save.href = url;
    save.download = link.download;
    save.hidden = true;
    document.body.append(save);
    save.click();
    save.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000); // the browser has the file long before
  } catch (err) {
    showError(err.code ?? "download_failed", err.message);
    if (err.status === 401) askForKey(() => download(link));
  } finally {
    delete link.dataset.busy;
  }
}

for (const link of Object.values(el.downloads)) {
  link.addEventListener("click", (event) => {
    event.preventDefault();
    download(link);
  });
}

// ---- controls ---------------------------------------------------------------------------------------------

el.uploadForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = [...el.file.files];
  if (files.length === 0) {
    view.generation++;
    clearView();
    setStatus("idle", "No file chosen.");
    showError("no_file", "Choose an image file (or the files of one DICOM series) first.");
    return;
  }
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  const query = el.modality.value ? `?modality=${encodeURIComponent(el.modality.value)}` : "";
  const generation = ++view.generation;
  clearView();
  setStatus("uploading", files.length === 1 ? "Uploading…" : `Uploading ${files.length} files…`);
  el.submit.disabled = true;
  try {
    const job = await api(API + query, { method: "POST", body: form });
    if (generation === view.generation) follow(job.id, job);
  } catch (err) {
    if (generation !== view.generation) return;
    setStatus("failed", "Upload refused");
    showError(err.code, err.message);
    if (err.status === 401) askForKey(() => el.uploadForm.requestSubmit());
  } finally {
    el.submit.disabled = false;
  }
});

el.openForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const id = el.jobId.value.trim();
  if (id) follow(id);
  else el.jobId.focus();
});

el.slice.addEventListener("input", () => setSlice(Number(el.slice.value)));
el.prev.addEventListener("click", () => setSlice(view.index - 1));
el.next.addEventListener("click", () => setSlice(view.index + 1));
el.marks.addEventListener("click", (event) => {
  const index = event.target.dataset?.index;
  if (index !== undefined) setSlice(Number(index));
});

const STEPS = { ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1, PageDown: -10, PageUp: 10 };
document.addEventListener("keydown", (event) => {
  if (!view.job || view.count < 2 || event.altKey || event.ctrlKey || event.metaKey) return;
  const target = event.target;
  if (target === el.slice || target.closest?.("select, textarea, input:not([type=file])")) return; // their own keys
  if (event.key in STEPS) setSlice(view.index + STEPS[event.key]);
  else if (event.key === "Home") setSlice(0);
  else if (event.key === "End") setSlice(view.count - 1);
  else return;
  event.preventDefault();
});

el.stage.addEventListener("wheel", (event) => {
  if (!view.job || view.count < 2) return;
  event.preventDefault();
  view.wheel += event.deltaMode === WheelEvent.DOM_DELTA_PIXEL ? event.deltaY : event.deltaY * WHEEL_STEP;
  const steps = Math.trunc(view.wheel / WHEEL_STEP);
  if (steps !== 0) {
    view.wheel -= steps * WHEEL_STEP;
    setSlice(view.index + steps);
  }
}, { passive: false });

// The key: typed, kept for this tab only; Use (or Enter) tries again what the service refused without one.
el.key.addEventListener("input", () => {
  try {
    if (el.key.value) sessionStorage.setItem(KEY_ITEM, el.key.value);
    else sessionStorage.removeItem(KEY_ITEM);
  } catch {
    // storage switched off: the key lasts as long as the page
  }
});
el.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const retry = view.retry;
  view.retry = null;
  retry?.();
});

// ---- start ------------------------------------------------------------------------------------------------

try {
  el.key.value = sessionStorage.getItem(KEY_ITEM) ?? "";
} catch {
  // no storage: no key yet
}

const requested = new URLSearchParams(window.location.search).get("job");
if (requested) follow(requested.trim());
