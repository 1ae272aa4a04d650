// The c2p-serve viewer: upload or open a job, follow it, show the overlay slice by slice with its reliability.
// It uses the public REST API only, so it shows exactly what any client gets. Nothing is logged to the console.

const API = "/v1/segmentations";
const POLL_MS = 500;
const WHEEL_STEP = 60; // pixels of wheel travel per slice, so a trackpad does not race through a volume

const $ = (id) => document.getElementById(id);
const el = {
  uploadForm: $("upload-form"), file: $("file"), modality: $("modality"), submit: $("submit"),
  openForm: $("open-form"), jobId: $("job-id"), open: $("open"),
  status: $("status"), currentJob: $("current-job"),
  error: $("error"), errorCode: $("error-code"), errorMessage: $("error-message"),
  report: $("report"), score: $("score"), level: $("level"), suppressedNote: $("suppressed-note"),
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
const view = { generation: 0, job: null, count: 0, index: 0, slices: new Map(), wheel: 0 };

async function api(path, init) {
  let response;
  try {
    response = await fetch(path, { cache: "no-store", ...init });
  } catch {
    throw new ApiError("network", "The service could not be reached.");
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: handled below
  }
  if (!response.ok) {
    const code = body?.code ?? `http_${response.status}`;
    const message = body?.message ?? (response.statusText || "The request failed.");
    throw new ApiError(code, message, response.status);
  }
  if (body === null) throw new ApiError("bad_response", "The service sent an answer this page cannot read.");
  return body;
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
  el.imageError.hidden = true;
  el.placeholder.hidden = false;
  el.stage.dataset.state = "empty";
  view.job = null;
  view.count = 0;
  view.slices = new Map();
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
  el.overlay.src = resultUrl(view.job.id, "png", k);
  el.overlay.alt = `Slice ${k + 1} of ${view.count} with the segmentation in red`;
  for (const near of [k - 1, k + 1]) {
    if (near >= 0 && near < view.count) new Image().src = resultUrl(view.job.id, "png", near); // smooth scrolling
  }
}

// An <img> cannot read the JSON error of a failed request: ask again with fetch to show its message.
el.overlay.addEventListener("error", async () => {
  const src = el.overlay.getAttribute("src");
  if (!src) return;
  let text = "The overlay could not be loaded.";
  try {
    const response = await fetch(src, { cache: "no-store" });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      if (body?.message) text = `${body.code}: ${body.message}`;
    }
  } catch {
    // the same generic text
  }
  if (el.overlay.getAttribute("src") !== src) return;
  el.imageError.textContent = text;
  el.imageError.hidden = false;
});

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

// ---- start ------------------------------------------------------------------------------------------------

const requested = new URLSearchParams(window.location.search).get("job");
if (requested) follow(requested.trim());
