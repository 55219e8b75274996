// Logs: this key's stored chat completions (newest first, filtered by model and metadata), each with
// thumbs up/down and "Edit reply", which call POST /v1/tunery/feedback; then the comparison of an old
// and a new model on a held-out file (compare.js) and the key's aliases, switched from one model to
// another with one click.
import { get, post } from "./api.js";
import { compareCard } from "./compare.js";
import { field, h, table, when } from "./dom.js";
import { clearError, showError } from "./app.js";

const text = (c) => (Array.isArray(c) ? c.map((p) => p.text || "").join("") : c || "");
const lastUser = (row) => text(((row.request_messages || []).filter((m) => m.role === "user").pop() || {}).content);

async function rate(id, rating, corrected) {
  const body = { completion_id: id, rating };
  if (corrected !== undefined) body.corrected = corrected;
  return post("/v1/tunery/feedback", body);
}

function feedbackCell(c, status, refresh) {
  const fb = c.tunery && c.tunery.feedback;
  const reply = c.choices[0] ? c.choices[0].message.content || "" : "";
  const act = (rating, corrected) => async () => {
    try { await rate(c.id, rating, corrected); status.textContent = `Saved feedback on ${c.id}.`; clearError(); await refresh(); }
    catch (err) { showError(err); }
  };
  const editor = h("textarea", { "aria-label": `Corrected reply for ${c.id}`, rows: 3, hidden: true }, fb && fb.corrected ? fb.corrected : reply);
  const save = h("button", { type: "button", hidden: true, onclick: () => act("down", editor.value)() }, "Save correction");
  return h("div", { class: "row", dataset: { id: c.id } },
    h("button", { type: "button", class: "secondary", "aria-pressed": String(fb && fb.rating === "up"), "aria-label": `Thumbs up ${c.id}`, onclick: act("up") }, "👍"),
    h("button", { type: "button", class: "secondary", "aria-pressed": String(fb && fb.rating === "down"), "aria-label": `Thumbs down ${c.id}`, onclick: act("down") }, "👎"),
    h("button", { type: "button", class: "secondary", onclick: () => { editor.hidden = false; save.hidden = false; editor.focus(); } }, "Edit reply"),
    editor, save,
    fb ? h("span", { class: "help" }, `rated ${fb.rating}${fb.corrected ? ", corrected" : ""}`) : null);
}

function aliasesCard(models, status) {
  const body = h("div", {});
  const name = h("input", { id: "alias-name", type: "text", placeholder: "support-router", autocomplete: "off" });
  const target = h("select", { id: "alias-model" }, models.map((m) => h("option", { value: m.id }, m.id)));
  async function refresh() {
    const aliases = (await get("/v1/tunery/aliases")).data;
    body.replaceChildren(table(["Alias", "Serves", "Before", "Switch"], aliases.map((a) => [a.name, a.model, a.previous_model || "—",
      h("button", { type: "button", class: "secondary", onclick: async () => {
        try { await post(`/v1/tunery/aliases/${encodeURIComponent(a.name)}`, { model: target.value }); status.textContent = `${a.name} now serves ${target.value}.`; await refresh(); }
        catch (err) { showError(err); }
      } }, "Switch to the selected model")])));
  }
  const form = h("form", { class: "card", id: "alias-form" },
    h("div", { class: "grid" }, field("Alias", name, "The stable name apps call."), field("Model", target, "What the alias serves.")),
    h("button", { type: "submit" }, "Set alias"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    try { await post(`/v1/tunery/aliases/${encodeURIComponent(name.value.trim())}`, { model: target.value }); clearError(); await refresh(); }
    catch (err) { showError(err); }
  });
  return { el: h("section", { "aria-labelledby": "aliases-title" }, h("h2", { id: "aliases-title" }, "Aliases"), form, body), refresh, target };
}

export async function logsPage() {
  const status = h("p", { class: "help", "aria-live": "polite" });
  const model = h("input", { id: "logs-model", type: "text", autocomplete: "off", placeholder: "any model" });
  const meta = h("input", { id: "logs-metadata", type: "text", autocomplete: "off", placeholder: "key=value" });
  const body = h("div", { id: "logs-rows" });
  async function refresh() {
    const query = { order: "desc", limit: 50 };
    if (model.value.trim()) query.model = model.value.trim();
    const [k, ...v] = meta.value.split("=");
    if (k.trim() && v.length) query[`metadata[${k.trim()}]`] = v.join("=");
    const rows = (await get("/v1/chat/completions", query)).data;
    // The request's messages come from the messages endpoint; the prompt shown is its last user turn.
    await Promise.all(rows.map(async (c) => { c.request_messages = (await get(`/v1/chat/completions/${c.id}/messages`, { limit: 100 })).data; }));
    body.replaceChildren(rows.length ? table(["Created", "Model", "Prompt", "Reply", "Feedback"], rows.map((c) =>
      [when(c.created), c.model, lastUser(c), c.choices[0] ? c.choices[0].message.content : "", feedbackCell(c, status, refresh)]))
      : h("p", {}, "No stored chat completions match. Apps store them with store: true."));
  }
  const filters = h("form", { class: "card", id: "logs-filters" },
    h("div", { class: "grid" }, field("Model", model), field("Metadata", meta, "One pair, key=value.")),
    h("button", { type: "submit" }, "Filter"));
  filters.addEventListener("submit", async (e) => { e.preventDefault(); try { await refresh(); clearError(); } catch (err) { showError(err); } });
  await refresh();
  const aliases = aliasesCard((await get("/v1/models")).data, status);
  await aliases.refresh();
  const compare = await compareCard(aliases.target);
  const el = h("section", { "aria-labelledby": "logs-title" }, h("h1", { id: "logs-title" }, "Logs"), filters, status, body, compare, aliases.el);
  return { el, title: "Logs" };
}
