// Tiny DOM helpers: h("tag", {attrs}, ...children). Text is always set as text, never as HTML, so
// model replies and file contents cannot inject markup.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

let fieldId = 0;
// A labelled form field: <label for> + control + optional one-line help (aria-describedby).
export function field(label, control, help) {
  const id = control.id || `f${++fieldId}`;
  control.id = id;
  const out = h("div", { class: "field" }, h("label", { for: id }, label), control);
  if (help) {
    const helpEl = h("div", { class: "help", id: `${id}-help` }, help);
    control.setAttribute("aria-describedby", helpEl.id);
    out.append(helpEl);
  }
  return out;
}

export function table(columns, rows, { caption } = {}) {
  return h("div", { class: "table-wrap" },
    h("table", {},
      caption ? h("caption", { class: "help" }, caption) : null,
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((cell) =>
        cell instanceof Node ? h("td", {}, cell)
          : h("td", { class: typeof cell === "number" ? "num" : "" }, cell ?? "—")))))));
}

export function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "—";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds < 0) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
