// Evaluate: run eval/compare on a test file on the server's models; metrics table, confusion
// matrices and the examples where the models disagree.
import { get, post, uploadFile } from "./api.js";
import { fmt } from "./chart.js";
import { field, h, table } from "./dom.js";
import { clearError, showError } from "./app.js";

const METRICS = ["n", "task", "exact_match", "accuracy", "macro_f1", "weighted_f1", "loss", "perplexity", "chrf", "rouge_l", "invalid"];

function confusion(row) {
  if (!row.confusion_matrix || !row.labels) return null;
  const labels = row.labels;
  return h("div", {},
    h("h2", {}, `Confusion matrix: ${row.label}`),
    table(["reference ↓ / predicted →", ...labels],
      row.confusion_matrix.map((counts, i) => [labels[i], ...counts]),
      { caption: "Rows are the reference labels, columns what the model answered." }));
}

export async function evaluatePage() {
  const models = (await get("/v1/models")).data;
  const fileInput = h("input", { id: "eval-file", type: "file", accept: ".jsonl,.json,.csv,.parquet", required: true });
  const picks = h("fieldset", { class: "checks" }, h("legend", {}, "Models to evaluate (up to 4)"),
    models.map((m, i) => h("label", {}, h("input", { type: "checkbox", value: m.id, checked: i === 0 }), ` ${m.id}`)));
  const extra = h("input", { id: "eval-extra", type: "text", autocomplete: "off", placeholder: "e.g. /models/my-base" });
  const maxNew = h("input", { id: "eval-max-new", type: "number", min: 1, placeholder: "auto" });
  const run = h("button", { type: "submit", id: "run-eval" }, "Run evaluation");
  const results = h("div", { id: "eval-results", "aria-live": "polite" });

  const form = h("form", { class: "card" },
    h("div", { class: "grid" },
      field("Test file", fileInput, "Chat examples; the last assistant message of each is the reference."),
      field("Max new tokens", maxNew, "auto: enough for the longest reference."),
      field("Another model (optional)", extra, "Any model name the server knows, or a model directory on the server.")),
    picks, h("div", { class: "row", style: "margin-top:8px" }, run));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const chosen = [...picks.querySelectorAll("input:checked")].map((x) => x.value);
    if (extra.value.trim()) chosen.unshift(extra.value.trim());
    if (!fileInput.files[0]) { showError(new Error("Choose a test file.")); fileInput.focus(); return; }
    if (!chosen.length) { showError(new Error("Pick at least one model.")); return; }
    run.disabled = true;
    results.replaceChildren(h("p", { class: "help" }, "Uploading and evaluating… this generates a reply per example."));
    try {
      const up = await uploadFile(fileInput.files[0], "evals");
      const res = await post("/v1/tunery/evaluate", {
        file: up.id, models: chosen, max_new_tokens: maxNew.value ? Number(maxNew.value) : undefined,
      });
      clearError();
      results.replaceChildren(
        h("div", { class: "card" }, h("h2", {}, "Metrics"),
          table(["model", ...METRICS.map((m) => m.replaceAll("_", " "))],
            res.rows.map((r) => [r.label, ...METRICS.map((m) => (typeof r[m] === "number" ? fmt(r[m]) : r[m] ?? "—"))]))),
        ...res.rows.map(confusion).filter(Boolean).map((c) => h("div", { class: "card" }, c)),
        h("div", { class: "card" }, h("h2", {}, `Disagreements (${res.disagreements.length})`),
          res.disagreements.length
            ? table(["line", "prompt", "reference", ...res.rows.map((r) => r.label)],
              res.disagreements.map((d) => [d.line, d.prompt, d.reference, ...res.rows.map((r) => d.predictions[r.label])]))
            : h("p", { class: "help" }, chosen.length > 1 ? "The models agree on every example." : "Pick two or more models to see where they disagree.")));
    } catch (err) {
      showError(err);
      results.replaceChildren();
    } finally { run.disabled = false; }
  });
  const el = h("section", { "aria-labelledby": "eval-title" }, h("h1", { id: "eval-title" }, "Evaluate"), form, results);
  return { el, title: "Evaluate" };
}
