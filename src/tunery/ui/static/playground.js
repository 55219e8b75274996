// Playground: the same prompt to several models side by side (base and fine-tuned), streamed.
import { get, streamSSE } from "./api.js";
import { field, h } from "./dom.js";
import { clearError, showError } from "./app.js";

export async function playgroundPage(params) {
  const models = (await get("/v1/models")).data;
  const wanted = new Set(params.getAll("model"));
  if (!wanted.size && models.length) {
    // Default: the first base model and the newest fine-tuned one, the usual comparison.
    wanted.add(models[0].id);
    const ft = models.filter((m) => m.id.startsWith("ft:")).sort((a, b) => b.created - a.created)[0];
    if (ft) wanted.add(ft.id);
  }
  // A model named in the link but not listed (a server-side directory) still gets a checkbox.
  for (const id of [...wanted].reverse()) if (!models.some((m) => m.id === id)) models.unshift({ id, created: 0 });
  const picks = h("fieldset", { class: "checks" }, h("legend", {}, "Models"),
    models.map((m, i) => h("label", {},
      h("input", { type: "checkbox", value: m.id, checked: wanted.has(m.id), id: `pick-${i}` }), ` ${m.id}`)));
  const system = h("textarea", { id: "system", rows: 2, placeholder: "optional" });
  const prompt = h("textarea", { id: "prompt", rows: 3, required: true, placeholder: "Ask something… (Ctrl+Enter sends)" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, max: 4096, value: 128 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0.7 });
  const send = h("button", { type: "submit", id: "send" }, "Send");
  const clear = h("button", { type: "button", class: "secondary" }, "New conversation");
  const columns = h("div", { class: "columns", id: "chat-columns" });
  const histories = new Map(); // model -> messages
  let abort = new AbortController();

  function column(modelId) {
    let col = columns.querySelector(`[data-model="${CSS.escape(modelId)}"]`);
    if (!col) {
      col = h("div", { class: "card", dataset: { model: modelId } },
        h("h2", {}, modelId), h("div", { class: "chat", "aria-live": "polite" }));
      columns.append(col);
    }
    return col.querySelector(".chat");
  }

  async function ask(modelId, text) {
    const history = histories.get(modelId) || [];
    histories.set(modelId, history);
    history.push({ role: "user", content: text });
    const chat = column(modelId);
    chat.append(h("div", { class: "msg user" }, text));
    const out = h("div", { class: "msg assistant", dataset: { state: "streaming" } }, "");
    chat.append(out);
    const messages = [...(system.value.trim() ? [{ role: "system", content: system.value.trim() }] : []), ...history];
    let reply = "";
    try {
      await streamSSE("/v1/chat/completions", {
        method: "POST", signal: abort.signal,
        json: { model: modelId, messages, stream: true, max_tokens: Number(maxTokens.value) || 128,
          temperature: Number(temperature.value) },
      }, (chunk) => {
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) { reply += delta; out.textContent = reply; }
      });
      out.dataset.state = "done";
      history.push({ role: "assistant", content: reply });
      if (!reply) out.textContent = "(empty reply)";
    } catch (err) {
      out.dataset.state = "error";
      out.classList.add("bad");
      out.textContent = err.name === "AbortError" ? "(stopped)" : err.message;
      history.pop();
    }
  }

  const form = h("form", { id: "playground-form" },
    h("div", { class: "card" }, picks,
      h("div", { class: "grid" }, field("System message", system),
        field("Max tokens", maxTokens), field("Temperature", temperature, "0 = always the most likely token."))),
    h("div", { class: "card" }, field("Prompt", prompt), h("div", { class: "row", style: "margin-top:8px" }, send, clear)));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const chosen = [...picks.querySelectorAll("input:checked")].map((x) => x.value);
    const text = prompt.value.trim();
    if (!chosen.length) { showError(new Error("Pick at least one model.")); return; }
    if (!text) { showError(new Error("Type a prompt first.")); prompt.focus(); return; }
    clearError();
    for (const col of columns.querySelectorAll("[data-model]")) if (!chosen.includes(col.dataset.model)) col.remove();
    chosen.forEach(column); // columns in the picker's order
    prompt.value = "";
    send.disabled = true;
    await Promise.all(chosen.map((m) => ask(m, text)));
    send.disabled = false;
    prompt.focus();
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });
  clear.addEventListener("click", () => {
    abort.abort(); abort = new AbortController();
    histories.clear(); columns.replaceChildren(); send.disabled = false;
  });
  const el = h("section", { "aria-labelledby": "pg-title" }, h("h1", { id: "pg-title" }, "Playground"), form, columns);
  return { el, title: "Playground", cleanup: () => abort.abort() };
}
