// Models: base aliases and this key's fine-tuned models and checkpoints; delete and export.
import { del, get } from "./api.js";
import { when, h, table } from "./dom.js";
import { exportModel } from "./jobs.js";
import { clearError, showError } from "./app.js";

export async function modelsPage() {
  const body = h("div", {});
  const status = h("p", { class: "help", "aria-live": "polite" });
  async function refresh() {
    const models = (await get("/v1/models")).data;
    body.replaceChildren(table(["Model", "Owner", "Created", "Served by", "Actions"], models.map((m, i) => {
      const base = m.owned_by === "tunery";
      const format = h("select", { "aria-label": `Export format for ${m.id}`, id: `fmt-${i}` },
        h("option", { value: "adapter" }, "PEFT adapter"), h("option", { value: "hf" }, "merged HF"),
        h("option", { value: "gguf" }, "GGUF"));
      const actions = h("div", { class: "row" },
        h("a", { href: `#/playground?model=${encodeURIComponent(m.id)}` }, "Chat"));
      if (!base) {
        actions.append(format,
          h("button", { type: "button", class: "secondary", onclick: async (e) => {
            e.target.disabled = true;
            status.textContent = `Exporting ${m.id} as ${format.value}…`;
            try { await exportModel(m.id, format.value); status.textContent = `Exported ${m.id}.`; clearError(); }
            catch (err) { showError(err); status.textContent = ""; }
            e.target.disabled = false;
          } }, "Export"),
          h("button", { type: "button", class: "danger", onclick: async () => {
            if (!confirm(`Delete ${m.id}? This cannot be undone.`)) return;
            try { await del(`/v1/models/${encodeURIComponent(m.id)}`); status.textContent = `Deleted ${m.id}.`; await refresh(); }
            catch (err) { showError(err); }
          } }, "Delete"));
      }
      // Which serving engine answers for the model (docs/serving.md), and why not llama.cpp where not.
      const engine = (m.tunery || {}).engine;
      const served = h("span", { title: (m.tunery || {}).reason || "" }, engine === "llamacpp" ? "llama.cpp" : (engine || "—"));
      return [m.id, base ? "builtin" : m.owned_by, base ? "—" : when(m.created), served, actions];
    })));
  }
  await refresh();
  const el = h("section", { "aria-labelledby": "models-title" }, h("h1", { id: "models-title" }, "Models"), status, body);
  return { el, title: "Models" };
}
