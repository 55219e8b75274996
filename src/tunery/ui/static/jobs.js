// Jobs (live table) and Job detail (live curves from the events stream, event log, checkpoints,
// metrics table, cancel/pause/resume, downloads).
import { ApiError, get, post, request, saveBlob, streamSSE } from "./api.js";
import { fmt, LineChart } from "./chart.js";
import { duration, h, table, when } from "./dom.js";
import { clearError, showError } from "./app.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];
const ACTIVE = ["validating_files", "queued", "running"];

// Progress of a running job: its latest metrics event (step / total_steps).
async function progressOf(job) {
  if (job.status === "succeeded") return 1;
  if (job.status !== "running" && job.status !== "paused") return job.status === "queued" ? 0 : null;
  const events = await get(`/v1/fine_tuning/jobs/${job.id}/events`, { limit: 50 });
  const m = events.data.find((e) => e.type === "metrics" && e.data && e.data.total_steps);
  return m ? m.data.step / m.data.total_steps : 0;
}

function statusCell(status) {
  return h("span", { class: `status status-${status}` }, status.replace("_", " "));
}

export async function jobsPage() {
  const body = h("div", {}, h("p", { class: "help" }, "Loading jobs…"));
  const el = h("section", { "aria-labelledby": "jobs-title" },
    h("div", { class: "row" }, h("h1", { id: "jobs-title" }, "Fine-tuning jobs"),
      h("a", { href: "#/new", class: "button" }, "New job")),
    body);
  let timer = null, stopped = false;
  async function refresh() {
    try {
      const jobs = (await get("/v1/fine_tuning/jobs", { limit: 100 })).data;
      const progress = await Promise.all(jobs.map((j) => progressOf(j).catch(() => null)));
      clearError();
      if (!jobs.length) {
        body.replaceChildren(h("p", {}, "No jobs yet. ", h("a", { href: "#/new" }, "Start one"), "."));
      } else {
        body.replaceChildren(table(
          ["Job", "Status", "Base model", "Method", "Objective", "Progress", "Created", "Duration"],
          jobs.map((j, i) => [
            h("a", { href: `#/jobs/${j.id}` }, j.id),
            statusCell(j.status),
            j.model.length > 40 ? "…" + j.model.slice(-38) : j.model,
            j.tunery?.method ?? "—",
            j.tunery?.objective ?? "—",
            progress[i] === null ? "—"
              : h("span", {}, h("progress", { max: 1, value: progress[i], "aria-label": `progress of ${j.id}` }),
                ` ${Math.round(progress[i] * 100)}%`),
            when(j.created_at),
            duration((j.finished_at || Date.now() / 1000) - j.created_at),
          ])));
      }
    } catch (err) { showError(err); }
    if (!stopped) timer = setTimeout(refresh, 2000);
  }
  await refresh();
  return { el, title: "Jobs", cleanup: () => { stopped = true; clearTimeout(timer); } };
}

export async function jobPage(id) {
  let job = await get(`/v1/fine_tuning/jobs/${id}`);
  const abort = new AbortController();
  let stopped = false, timer = null, streaming = false;
  const seen = new Set();

  const info = h("dl", { class: "kv" });
  const actions = h("div", { class: "row" });
  const lossCanvas = h("canvas", { class: "chart", id: "loss-chart", role: "img" });
  const accCanvas = h("canvas", { class: "chart", id: "accuracy-chart", role: "img" });
  const lossChart = new LineChart(lossCanvas, { yLabel: "loss" });
  const accChart = new LineChart(accCanvas, { yLabel: "token accuracy", yRange: [0, 1] });
  const lossLegend = h("div", { class: "legend" });
  const accLegend = h("div", { class: "legend" });
  const log = h("div", { class: "log", id: "event-log", tabindex: "0", "aria-label": "Event log" });
  const metricsBox = h("div", {}, h("p", { class: "help" }, "No steps logged yet."));
  const ckptBox = h("div", {}, h("p", { class: "help" }, "No checkpoints yet."));
  const downloads = h("div", { class: "row" });
  const metricRows = new Map();

  const el = h("section", { "aria-labelledby": "job-title" },
    h("h1", { id: "job-title" }, `Job ${id}`),
    h("div", { class: "card" }, info, h("div", { style: "margin-top:10px" }, actions)),
    h("div", { class: "columns" },
      h("div", { class: "card" }, h("h2", {}, "Loss"), lossCanvas, lossLegend),
      h("div", { class: "card" }, h("h2", {}, "Token accuracy"), accCanvas, accLegend)),
    h("div", { class: "card" }, h("h2", {}, "Events"), log),
    h("div", { class: "card" }, h("h2", {}, "Checkpoints"), ckptBox),
    h("div", { class: "card" }, h("h2", {}, "Metrics"), metricsBox),
    h("div", { class: "card" }, h("h2", {}, "Downloads"), downloads));

  function renderInfo() {
    const fin = job.finished_at ? duration(job.finished_at - job.created_at) : null;
    const rows = [
      ["Status", statusCell(job.status)],
      ["Base model", job.model],
      ["Method / objective", `${job.tunery?.method ?? "—"} / ${job.tunery?.objective ?? "—"}`],
      ["Hyperparameters", Object.entries(job.hyperparameters || {}).map(([k, v]) => `${k}=${v}`).join(", ")],
      ["Created", when(job.created_at)],
      ["Finished", job.finished_at ? `${when(job.finished_at)} (${fin})` : "—"],
      ["Trained tokens", job.trained_tokens ?? "—"],
      ["Fine-tuned model", job.fine_tuned_model ?? "—"],
    ];
    if (job.error && job.error.message) rows.push(["Error", h("span", { class: "bad" }, job.error.message)]);
    info.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    info.dataset.status = job.status;
    const act = (label, verb, enabled, cls) => h("button", {
      type: "button", class: cls, disabled: !enabled,
      onclick: async () => {
        try { job = await post(`/v1/fine_tuning/jobs/${id}/${verb}`); clearError(); renderInfo(); follow(); }
        catch (err) { showError(err); }
      },
    }, label);
    actions.replaceChildren(...[
      act("Pause", "pause", ["queued", "running"].includes(job.status), "secondary"),
      act("Resume", "resume", job.status === "paused", "secondary"),
      act("Cancel", "cancel", [...ACTIVE, "paused"].includes(job.status), "danger"),
      job.fine_tuned_model ? h("a", { href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}` },
        "Chat with it") : null,
    ].filter(Boolean));
    renderDownloads();
  }

  function renderDownloads() {
    const items = (job.result_files || []).map((fid) => h("button", {
      type: "button", class: "secondary",
      onclick: () => downloadResult(fid).catch(showError),
    }, `Results CSV (${fid})`));
    if (job.fine_tuned_model) {
      items.push(h("button", {
        type: "button", class: "secondary",
        onclick: () => exportModel(job.fine_tuned_model, "adapter").catch(showError),
      }, "Model (adapter zip)"));
    }
    downloads.replaceChildren(...(items.length ? items : [h("p", { class: "help" }, "Available when the job succeeds.")]));
  }

  function addEvent(ev) {
    if (seen.has(ev.id)) return;
    seen.add(ev.id);
    log.append(h("div", { class: `lvl-${ev.level}` }, `${new Date(ev.created_at * 1000).toLocaleTimeString()}  ${ev.message}`));
    log.scrollTop = log.scrollHeight;
    const d = ev.data || {};
    if (ev.type === "metrics" && d.step !== undefined) {
      lossChart.add("train loss", d.step, d.train_loss);
      lossChart.add("validation loss", d.step, d.valid_loss ?? d.full_valid_loss);
      accChart.add("train", d.step, d.train_mean_token_accuracy);
      accChart.add("validation", d.step, d.valid_mean_token_accuracy ?? d.full_valid_mean_token_accuracy);
      metricRows.set(d.step, d);
      renderMetrics();
    }
    if (d.kind === "checkpoint" || /Checkpoint created|successfully completed/.test(ev.message)) loadCheckpoints();
  }

  function renderMetrics() {
    const rows = [...metricRows.values()].sort((a, b) => b.step - a.step);
    const cols = ["step", "epoch", "train_loss", "train_mean_token_accuracy", "valid_loss",
      "valid_mean_token_accuracy", "learning_rate", "tokens_per_second"];
    metricsBox.replaceChildren(table(cols.map((c) => c.replaceAll("_", " ")),
      rows.map((r) => cols.map((c) => (r[c] === undefined || r[c] === null ? "—" : fmt(r[c]))))));
    const legend = (chart, box) => box.replaceChildren(...chart.legend().map((s) =>
      h("span", { style: `--c:${s.color}` }, s.name)));
    legend(lossChart, lossLegend); legend(accChart, accLegend);
  }

  async function loadCheckpoints() {
    try {
      const ck = (await get(`/v1/fine_tuning/jobs/${id}/checkpoints`, { limit: 100 })).data;
      ckptBox.replaceChildren(ck.length ? table(["Step", "Model name", "Train loss", "Valid loss", "Created"],
        ck.map((c) => [c.step_number, c.fine_tuned_model_checkpoint, fmt(c.metrics.train_loss),
          fmt(c.metrics.valid_loss), when(c.created_at)])) : h("p", { class: "help" }, "No checkpoints yet."));
    } catch (err) { showError(err); }
  }

  async function follow() {
    if (streaming || stopped) return;
    streaming = true;
    try {
      await streamSSE(`/v1/fine_tuning/jobs/${id}/events`, { query: { stream: true }, signal: abort.signal }, addEvent);
    } catch (err) { if (!stopped) showError(err); }
    streaming = false;
  }

  async function poll() {
    try {
      const prev = job.status;
      job = await get(`/v1/fine_tuning/jobs/${id}`);
      if (job.status !== prev) { renderInfo(); loadCheckpoints(); }
      if (!TERMINAL.includes(job.status) && job.status !== "paused") follow();
    } catch (err) { if (!(err instanceof ApiError && err.status === 0)) showError(err); }
    if (!stopped) timer = setTimeout(poll, 2000);
  }

  renderInfo();
  loadCheckpoints();
  follow(); // replays every event from the first, then live ones until the job stops
  timer = setTimeout(poll, 2000);
  return {
    el, title: `Job ${id}`,
    cleanup: () => { stopped = true; abort.abort(); clearTimeout(timer); lossChart.observer.disconnect(); accChart.observer.disconnect(); },
  };
}

// The results file is served base64-encoded (as OpenAI does); decode before saving.
async function downloadResult(fileId) {
  const meta = await get(`/v1/files/${fileId}`);
  const resp = await request("GET", `/v1/files/${fileId}/content`, { raw: true });
  const text = (await resp.text()).trim();
  let blob;
  try { blob = new Blob([Uint8Array.from(atob(text), (c) => c.charCodeAt(0))], { type: "text/csv" }); }
  catch { blob = new Blob([text], { type: "text/csv" }); }
  saveBlob(blob, meta.filename || `${fileId}.csv`);
}

export async function exportModel(model, format) {
  const resp = await request("POST", "/v1/tunery/export", { json: { model, format }, raw: true });
  const name = /filename="?([^"]+)"?/.exec(resp.headers.get("content-disposition") || "")?.[1] || `${format}.zip`;
  saveBlob(await resp.blob(), name);
}
