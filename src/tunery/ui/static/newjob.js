// New job: upload with a live validation report, base model / method / objective pickers from the
// registries, hyperparameters with `auto` defaults and one-line help, a memory/time estimate.
import { get, post, request, uploadFile } from "./api.js";
import { bytes, duration, field, h } from "./dom.js";
import { clearError, showError } from "./app.js";

// Objectives whose data OpenAI's method types name; any other objective rides in `tunery`.
const TYPE_FOR_OBJECTIVE = { sft: "supervised", dpo: "dpo" };

function optionInput(opt) {
  if (opt.choices) {
    return h("select", { dataset: { opt: opt.name } },
      h("option", { value: "" }, `default (${opt.default})`),
      opt.choices.map((c) => h("option", { value: c }, String(c))));
  }
  if (opt.type === "boolean") {
    return h("select", { dataset: { opt: opt.name } },
      h("option", { value: "" }, `default (${opt.default})`),
      h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
  }
  return h("input", {
    type: "text", dataset: { opt: opt.name, kind: opt.type },
    placeholder: opt.default === null || opt.default === undefined ? "none" : JSON.stringify(opt.default),
    inputmode: ["integer", "number"].includes(opt.type) ? "decimal" : undefined,
  });
}

// Only the fields a user filled in are sent: everything else keeps the server's defaults.
function readOptions(box) {
  const out = {};
  for (const el of box.querySelectorAll("[data-opt]")) {
    const v = el.value.trim();
    if (!v) continue;
    const kind = el.dataset.kind;
    if (v === "true" || v === "false") out[el.dataset.opt] = v === "true";
    else if ((kind === "integer" || kind === "number") && !Number.isNaN(Number(v))) out[el.dataset.opt] = Number(v);
    else if (v.startsWith("[") || v.startsWith("{")) { try { out[el.dataset.opt] = JSON.parse(v); } catch { out[el.dataset.opt] = v; } }
    else out[el.dataset.opt] = v;
  }
  return out;
}

function optionFields(options) {
  return options.map((o) => field(o.name, optionInput(o), o.description));
}

function renderReport(box, report) {
  const stats = report.stats || {};
  const head = report.ok
    ? h("p", { class: "ok" }, `✓ ${report.path}: ${report.n} examples, format ${report.format}, no problems found.`)
    : h("p", { class: "bad" }, `✗ ${report.path}: ${report.n_errors} problem(s) in ${report.n} examples (format ${report.format}).`);
  const issue = (i, cls) => h("li", { class: cls },
    i.line ? `Line ${i.line}` : "File", i.field ? ` (${i.field})` : "", `: ${i.message}`);
  box.replaceChildren(...[head,
    report.errors.length ? h("ul", { class: "report", "aria-label": "Errors" }, report.errors.map((i) => issue(i, "bad"))) : null,
    report.n_errors > report.errors.length ? h("p", { class: "help" }, `…and ${report.n_errors - report.errors.length} more.`) : null,
    report.warnings.length ? h("ul", { class: "report", "aria-label": "Warnings" }, report.warnings.map((i) => issue(i, "warn"))) : null,
    stats.valid_examples !== undefined ? h("p", { class: "help" }, `${stats.valid_examples} usable examples.`) : null,
  ].filter(Boolean));
  box.dataset.ok = String(report.ok);
}

export async function newJobPage() {
  const [reg, models] = await Promise.all([get("/v1/tunery/registry"), get("/v1/models")]);
  const state = { train: null, valid: null };

  const objective = h("select", { id: "objective" }, reg.objectives.map((o) =>
    h("option", { value: o.name, selected: o.name === "sft" }, o.name)));
  const method = h("select", { id: "method" }, reg.methods.map((m) =>
    h("option", { value: m.name, selected: m.name === "lora" }, m.name)));
  const objectiveHelp = h("div", { class: "help" });
  const methodHelp = h("div", { class: "help" });
  const methodOpts = h("div", { class: "grid" });
  const objectiveOpts = h("div", { class: "grid" });
  const modelList = h("datalist", { id: "model-list" },
    models.data.map((m) => h("option", { value: m.id })));
  const model = h("input", { id: "base-model", type: "text", list: "model-list", required: true,
    value: models.data[0]?.id || "", placeholder: "alias, ft: model or /path/to/hf-dir", autocomplete: "off" });
  const trainInput = h("input", { id: "training-file", type: "file", accept: ".jsonl,.json,.csv,.parquet", required: true });
  const validInput = h("input", { id: "validation-file", type: "file", accept: ".jsonl,.json,.csv,.parquet" });
  const trainReport = h("div", { id: "training-report", "aria-live": "polite" });
  const validReport = h("div", { id: "validation-report", "aria-live": "polite" });
  const suffix = h("input", { id: "suffix", type: "text", maxlength: 64, pattern: "[A-Za-z0-9_.\\-]*" });
  const seed = h("input", { id: "seed", type: "number", min: 0, placeholder: "random" });
  // OpenAI's legacy classification metrics: scored on the validation file, columns in results.csv.
  const classMetrics = h("input", { id: "compute-classification-metrics", type: "checkbox" });
  const positiveClass = h("input", { id: "classification-positive-class", type: "text", autocomplete: "off", placeholder: "binary tasks only" });
  const hpOpenAI = reg.hyperparameters.filter((p) => p.openai);
  const hpMore = reg.hyperparameters.filter((p) => !p.openai);
  const hpBox = h("div", { class: "grid" }, hpOpenAI.map((p) => field(p.name,
    h("input", { type: "text", id: `hp-${p.name}`, value: "auto", dataset: { hp: p.name } }), p.description)));
  const hpMoreBox = h("div", { class: "grid" }, optionFields(hpMore));
  const estimateBox = h("div", { id: "estimate", "aria-live": "polite" }, h("p", { class: "help" },
    "Choose a training file and a base model to see an estimate."));
  const submit = h("button", { type: "submit", id: "create-job" }, "Create job");

  function describe() {
    const o = reg.objectives.find((x) => x.name === objective.value);
    const m = reg.methods.find((x) => x.name === method.value);
    objectiveHelp.textContent = o ? `${o.description} (trains on ${o.data_kind} data)` : "";
    methodHelp.textContent = m ? `${m.description} Trainable: ${m.scale}.` : "";
    methodOpts.replaceChildren(...(m && m.options.length ? optionFields(m.options) : [h("p", { class: "help" }, "No options.")]));
    objectiveOpts.replaceChildren(...(o && o.options.length ? optionFields(o.options) : [h("p", { class: "help" }, "No options.")]));
  }

  async function check(input, box, which) {
    state[which] = null;
    const file = input.files[0];
    if (!file) { box.replaceChildren(); return; }
    box.replaceChildren(h("p", { class: "help" }, `Checking ${file.name}…`));
    try {
      const report = await request("POST", "/v1/tunery/validate", {
        body: file, extraHeaders: { "Content-Type": "application/octet-stream" },
        query: { filename: file.name, method: objective.value, min_examples: which === "train" ? 10 : 1 },
      });
      renderReport(box, report);
      if (report.ok) {
        const up = await uploadFile(file, "fine-tune");
        state[which] = up.id;
        box.append(h("p", { class: "help" }, `Uploaded as ${up.id}.`));
        if (which === "train") estimate();
      }
      clearError();
    } catch (err) { box.replaceChildren(h("p", { class: "bad" }, err.message)); }
  }

  function hyperparameters() {
    const hp = {};
    for (const el of hpBox.querySelectorAll("[data-hp]")) {
      const v = el.value.trim();
      hp[el.dataset.hp] = !v || v === "auto" ? "auto" : Number(v);
    }
    return hp;
  }

  let estimateSeq = 0;
  async function estimate() {
    if (!state.train || !model.value.trim()) return;
    const seq = ++estimateSeq;
    estimateBox.replaceChildren(h("p", { class: "help" }, "Estimating…"));
    try {
      const e = await post("/v1/tunery/estimate", {
        model: model.value.trim(), method: method.value, objective: objective.value, training_file: state.train,
        hyperparameters: { ...hyperparameters(), ...readOptions(hpMoreBox) }, options: readOptions(methodOpts),
      });
      if (seq !== estimateSeq) return;
      const m = e.memory_bytes;
      estimateBox.replaceChildren(h("dl", { class: "kv" },
        h("dt", {}, "Memory"), h("dd", {}, `${bytes(m.total)} (weights ${bytes(m.weights)}, gradients + optimizer ${bytes(m.gradients_and_optimizer)}, activations ${bytes(m.activations)}, runtime ${bytes(m.runtime)}, load/save copy ${bytes(m.load_save_copy)})`),
        h("dt", {}, "Time"), h("dd", {}, `about ${duration(e.seconds)} on ${e.device}`),
        h("dt", {}, "Work"), h("dd", {}, `${e.n_examples} examples × ${e.n_epochs} epochs, batch ${e.batch_size}: ${e.total_steps} steps, ${e.trained_tokens.toLocaleString()} tokens`),
        h("dt", {}, "Trainable"), h("dd", {}, `${e.trainable_parameters.toLocaleString()} of ${e.parameters.toLocaleString()} parameters (${e.trainable_note})`),
        e.fits === false ? h("dt", { class: "bad" }, "Warning") : null,
        e.fits === false ? h("dd", { class: "bad" }, "This probably does not fit in the accelerator's memory.") : null),
      h("p", { class: "help" }, e.assumptions));
    } catch (err) { if (seq === estimateSeq) estimateBox.replaceChildren(h("p", { class: "bad" }, err.message)); }
  }

  objective.addEventListener("change", () => {
    describe();
    check(trainInput, trainReport, "train");
    check(validInput, validReport, "valid");
  });
  method.addEventListener("change", () => { describe(); estimate(); });
  model.addEventListener("change", estimate);
  hpBox.addEventListener("change", estimate);
  trainInput.addEventListener("change", () => check(trainInput, trainReport, "train"));
  validInput.addEventListener("change", () => check(validInput, validReport, "valid"));

  const form = h("form", { id: "new-job", novalidate: true },
    h("div", { class: "card" }, h("h2", {}, "Data"),
      h("div", { class: "grid" },
        h("div", {}, field("Training file", trainInput, "JSONL, JSON, CSV or Parquet; checked before upload."), trainReport),
        h("div", {}, field("Validation file (optional)", validInput, "Evaluated every epoch."), validReport))),
    h("div", { class: "card" }, h("h2", {}, "Model and training"),
      h("div", { class: "grid" },
        field("Base model", model, "A builtin alias, a fine-tuned ft: model (continues its training) or a model directory on the server."),
        h("div", {}, field("Objective", objective), objectiveHelp),
        h("div", {}, field("Method", method), methodHelp)),
      modelList,
      h("details", {}, h("summary", {}, "Method options"), methodOpts),
      h("details", {}, h("summary", {}, "Objective options"), objectiveOpts)),
    h("div", { class: "card" }, h("h2", {}, "Hyperparameters"), hpBox,
      h("details", {}, h("summary", {}, "More hyperparameters (Tunery)"), hpMoreBox),
      h("div", { class: "grid" }, field("Suffix", suffix, "Part of the fine-tuned model's name."),
        field("Seed", seed, "Same seed, same data order and initialisation."),
        field("Classification metrics", classMetrics, "Score the validation file as labels at each evaluation (accuracy, F1; needs a validation file)."),
        field("Positive class", positiveClass, "The positive label, for precision and recall of a binary task."))),
    h("div", { class: "card" }, h("h2", {}, "Estimate"), estimateBox,
      h("button", { type: "button", class: "secondary", id: "update-estimate", onclick: estimate }, "Update estimate")),
    submit);

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!state.train) { showError(new Error("Choose a training file that passes validation first.")); trainInput.focus(); return; }
    if (!model.value.trim()) { showError(new Error("Choose a base model.")); model.focus(); return; }
    const options = {};
    const mo = readOptions(methodOpts), oo = readOptions(objectiveOpts);
    if (Object.keys(mo).length) options[method.value] = mo;
    if (Object.keys(oo).length) options[objective.value] = { ...(options[objective.value] || {}), ...oo };
    const body = {
      model: model.value.trim(), training_file: state.train, validation_file: state.valid || undefined,
      hyperparameters: hyperparameters(),
      tunery: { method: method.value, objective: objective.value, options, hyperparameters: readOptions(hpMoreBox) },
      suffix: suffix.value.trim() || undefined, seed: seed.value === "" ? undefined : Number(seed.value),
    };
    if (classMetrics.checked) body.tunery.compute_classification_metrics = true;
    if (positiveClass.value.trim()) body.tunery.classification_positive_class = positiveClass.value.trim();
    const type = TYPE_FOR_OBJECTIVE[objective.value];
    if (type) body.method = { type };
    submit.disabled = true;
    try {
      const job = await post("/v1/fine_tuning/jobs", body);
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      showError(err);
      if (err.param) form.querySelector(`#hp-${err.param.split(".").pop()}`)?.focus();
    } finally { submit.disabled = false; }
  });

  describe();
  const el = h("section", { "aria-labelledby": "new-title" }, h("h1", { id: "new-title" }, "New fine-tuning job"), form);
  return { el, title: "New job" };
}
