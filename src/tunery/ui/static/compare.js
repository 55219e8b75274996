// The Compare card of the Logs page: old model against new on a held-out file (the test slice
// POST /v1/tunery/datasets wrote), through POST /v1/tunery/compare. The call is synchronous and slow
// on CPU, so the card asks for a sample size and shows a spinner with the replies made so far
// (GET /v1/tunery/compare/progress). The report shows the same fields the API returns.
import { get, post } from "./api.js";
import { field, h, table } from "./dom.js";
import { clearError, showError } from "./app.js";

const pct = (x) => (typeof x === "number" ? `${(100 * x).toFixed(1)}%` : "—");
const num = (x, d = 1) => (typeof x === "number" ? x.toFixed(d) : "—");

function scoreCells(r, classification) {
  return classification ? [pct(r.accuracy), num(r.macro_f1, 3), r.invalid ?? "—"] : [num(r.chrf)];
}

export function renderReport(res) {
  const classification = res.task === "classification";
  const scoreCols = classification ? ["accuracy", "macro F1", "invalid"] : ["chrF"];
  const head = `${res.n} examples${res.sampled_from ? ` (a sample of ${res.sampled_from})` : ""}, ${res.task}` +
    (res.skipped ? `; ${res.skipped} without a reference skipped` : "");
  const parts = [
    h("p", { class: "help", id: "compare-summary" }, head),
    table(["model", "exact match", ...scoreCols, "latency p50 (ms)", "latency p95 (ms)", "prompt tokens", "reply tokens"],
      res.models.map((r) => [r.label, pct(r.exact_match), ...scoreCells(r, classification),
        num(r.latency_ms.p50, 0), num(r.latency_ms.p95, 0), num(r.prompt_tokens.mean), num(r.completion_tokens.mean)]),
      { caption: "Latency is one request at a time; prompt tokens are counted in each model's own chat template." }),
  ];
  if (res.per_task) {
    const rows = [];
    for (const [name, t] of Object.entries(res.per_task)) {
      for (const r of t.models) rows.push([name, t.n, r.label, pct(r.exact_match), t.task === "classification" ? pct(r.accuracy) : num(r.chrf)]);
    }
    parts.push(h("h3", {}, "Per task"), table(["task", "examples", "model", "exact match", "accuracy / chrF"], rows));
  }
  const labels = res.models.map((r) => r.label);
  parts.push(h("h3", {}, `Where the replies differ (${res.n_disagreements})`),
    res.disagreements.length
      ? table(["prompt", "reference", ...labels], res.disagreements.map((d) => [d.prompt, d.reference, ...labels.map((l) => d.replies[l])]))
      : h("p", { class: "help" }, "The models give the same replies."));
  return h("div", { id: "compare-report" }, parts);
}

export async function compareCard(aliasTarget) {
  const [models, aliases, files] = await Promise.all([get("/v1/models"), get("/v1/tunery/aliases"), get("/v1/files", { purpose: "fine-tune" })]);
  const names = [...models.data.map((m) => m.id), ...aliases.data.map((a) => a.name)];
  const options = () => names.map((n) => h("option", { value: n }, n));
  const oldModel = h("select", { id: "compare-old" }, options());
  const newModel = h("select", { id: "compare-new" }, options());
  if (names.length > 1) newModel.value = names[names.length - 1];
  // Test slices first: they are what no model was trained on.
  const sorted = [...files.data].sort((a, b) => Number(b.filename.includes(".test.")) - Number(a.filename.includes(".test.")));
  const data = h("select", { id: "compare-file" }, sorted.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)));
  const size = h("input", { id: "compare-sample", type: "number", min: 1, max: 2000, value: 50 });
  const maxNew = h("input", { id: "compare-max-new", type: "number", min: 1, placeholder: "auto" });
  const run = h("button", { type: "submit", id: "run-compare" }, "Compare");
  const busy = h("div", { class: "busy", id: "compare-busy", hidden: true, role: "status" }, h("span", { class: "spinner", "aria-hidden": "true" }), h("span", { id: "compare-progress" }, "Starting…"));
  const out = h("div", { id: "compare-results", "aria-live": "polite" });
  const form = h("form", { class: "card", id: "compare-form" },
    h("div", { class: "grid" },
      field("Old model", oldModel, "The model apps get now (or the alias they call)."),
      field("New model", newModel, "The model trained on the logs."),
      field("Held-out file", data, "The test slice of a dataset built from the logs."),
      field("Sample size", size, "Examples to compare on: each one is a reply per model, slow on CPU."),
      field("Max new tokens", maxNew, "auto: from the references.")),
    h("div", { class: "row" }, run, busy));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!data.value) { showError(new Error("No fine-tune file yet: build a dataset from the logs first.")); return; }
    const body = { file: data.value, models: [oldModel.value, newModel.value], sample: Number(size.value) || undefined };
    if (maxNew.value) body.max_new_tokens = Number(maxNew.value);
    run.disabled = true; busy.hidden = false; out.replaceChildren();
    const label = busy.querySelector("#compare-progress");
    const timer = setInterval(async () => {
      try {
        const p = await get("/v1/tunery/compare/progress");
        if (p.running && p.total) label.textContent = `${p.done} of ${p.total} replies`;
      } catch { /* the answer below reports errors */ }
    }, 700);
    try {
      const res = await post("/v1/tunery/compare", body);
      clearError();
      out.replaceChildren(renderReport(res));
      if (aliasTarget && [...aliasTarget.options].some((o) => o.value === newModel.value)) aliasTarget.value = newModel.value;
    } catch (err) { showError(err); }
    finally { clearInterval(timer); run.disabled = false; busy.hidden = true; label.textContent = "Starting…"; }
  });
  return h("section", { "aria-labelledby": "compare-title" }, h("h2", { id: "compare-title" }, "Compare old and new"), form, out);
}
