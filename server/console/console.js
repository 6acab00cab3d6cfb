// The recast-serve console: a thin page over the public API v1, with the same API keys.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "recast-api-key";

function headers(extra) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return Object.assign(key ? { Authorization: "Bearer " + key } : {}, extra || {});
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(method, path, body, contentType) {
  const options = { method, headers: headers(contentType ? { "Content-Type": contentType } : {}) };
  if (body !== undefined) options.body = body;
  const response = await fetch(path, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const message = data && data.error ? `${data.error_type}: ${data.error}` : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return data;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

async function loadTasks() {
  const page = await api("GET", "/v1/tasks?limit=1000");
  const body = $("tasks").querySelector("tbody");
  body.replaceChildren();
  const select = $("predict-task");
  const chosen = select.value;
  select.replaceChildren();
  for (const task of page.tasks) {
    const row = document.createElement("tr");
    row.dataset.taskId = task.task_id;
    cell(row, task.task_id);
    cell(row, String(task.version));
    cell(row, task.labels.join(", "));
    cell(row, task.updated.slice(0, 19).replace("T", " "));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Delete";
    remove.addEventListener("click", () => deleteTask(task.task_id));
    cell(row, "").appendChild(remove);
    body.appendChild(row);
    const option = document.createElement("option");
    option.value = option.textContent = task.task_id;
    select.appendChild(option);
  }
  if (chosen) select.value = chosen;
  $("tasks-empty").hidden = page.tasks.length > 0;
}

async function deleteTask(taskId) {
  if (!confirm(`Delete task ${taskId}?`)) return;
  try {
    await api("DELETE", "/v1/tasks/" + encodeURIComponent(taskId));
    showError("");
    await loadTasks();
  } catch (error) { showError(error.message); }
}

function metricValue(text, name, labels) {
  let total = 0;
  let found = false;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$/);
    if (!match || match[1] !== name) continue;
    if (labels && !(match[2] || "").includes(labels)) continue;
    total += Number(match[3]);
    found = true;
  }
  return found ? String(Math.round(total)) : "0";
}

async function loadMetrics() {
  const response = await fetch("/metrics");
  if (!response.ok) return;
  const text = await response.text();
  $("m-tasks").textContent = metricValue(text, "recast_tasks_resident");
  $("m-requests").textContent = metricValue(text, "recast_requests_total");
  $("m-queue").textContent = metricValue(text, "recast_queue_texts");
  $("m-uploads").textContent = metricValue(text, "recast_uploads_total");
  $("m-rejected").textContent = metricValue(text, "recast_upload_rejections_total");
  $("m-jobs").textContent = metricValue(text, "recast_training_jobs_total", 'state="succeeded"');
}

async function loadBackbone() {
  try {
    const info = await api("GET", "/v1/backbone");
    $("backbone").textContent = `${info.model} · bank ${info.bank.fingerprint.slice(0, 12)} · kernel ${info.kernel.path}`;
  } catch (error) { $("backbone").textContent = error.message; }
}

async function followJob(job) {
  $("job").hidden = false;
  const bar = $("job-progress");
  const state = $("job-state");
  for (;;) {
    bar.value = job.progress;
    state.textContent = `${job.state} · ${job.phase} · ${Math.round(job.progress * 100)} %`;
    state.className = "";
    if (job.state === "succeeded") {
      const accuracy = job.result && job.result.val_accuracy != null ? (job.result.val_accuracy * 100).toFixed(1) : "?";
      state.textContent = `succeeded: ${job.task_id} version ${job.result.version}, validation accuracy ${accuracy} %`;
      state.className = "ok";
      await loadTasks();
      $("predict-task").value = job.task_id;
      return;
    }
    if (job.state === "failed" || job.state === "cancelled") {
      state.textContent = `${job.state}: ${job.error}`;
      state.className = "bad";
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
    job = await api("GET", "/v1/jobs/" + job.job_id);
  }
}

async function createTask(event) {
  event.preventDefault();
  const file = $("create-file").files[0];
  const taskId = $("create-id").value.trim();
  const epochs = $("create-epochs").value || "3";
  try {
    const csv = await file.text();
    const job = await api(
      "POST", `/v1/tasks/${encodeURIComponent(taskId)}/train?epochs=${encodeURIComponent(epochs)}`, csv, "text/csv");
    showError("");
    await followJob(job);
  } catch (error) { showError(error.message); }
}

async function uploadArtifact(event) {
  event.preventDefault();
  const file = $("upload-file").files[0];
  const taskId = $("upload-id").value.trim();
  try {
    const task = await api("PUT", "/v1/tasks/" + encodeURIComponent(taskId), await file.arrayBuffer(), "application/octet-stream");
    $("upload-result").textContent = `stored ${task.task_id} version ${task.version} (${task.labels.join(", ")})`;
    $("upload-result").className = "ok";
    showError("");
    await loadTasks();
  } catch (error) { showError(error.message); }
}

async function predict(event) {
  event.preventDefault();
  const taskId = $("predict-task").value;
  const texts = $("predict-texts").value.split("\n").map((t) => t.trim()).filter((t) => t);
  try {
    const answer = await api("POST", `/v1/tasks/${encodeURIComponent(taskId)}/predict`, JSON.stringify({ inputs: texts }), "application/json");
    const body = $("predictions").querySelector("tbody");
    body.replaceChildren();
    answer.outputs.forEach((output, i) => {
      const row = document.createElement("tr");
      cell(row, texts[i]);
      cell(row, output.label).className = "label";
      const scores = Object.entries(output.scores).sort((a, b) => b[1] - a[1]).slice(0, 3);
      cell(row, scores.map(([label, p]) => `${label} ${(p * 100).toFixed(1)} %`).join(", "));
      body.appendChild(row);
    });
    $("predictions").hidden = false;
    showError("");
  } catch (error) { showError(error.message); }
}

async function refresh() {
  try {
    await loadTasks();
    await loadMetrics();
    showError("");
  } catch (error) { showError(error.message); }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key); else sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = "";
  $("api-key").placeholder = key ? "key set for this tab" : "Bearer key (kept for this tab only)";
  refresh();
});
$("refresh").addEventListener("click", refresh);
$("create-form").addEventListener("submit", createTask);
$("upload-form").addEventListener("submit", uploadArtifact);
$("predict-form").addEventListener("submit", predict);
loadBackbone();
refresh();
setInterval(loadMetrics, 5000);
