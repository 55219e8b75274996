// The API client of the dashboard: the same endpoints and keys as any OpenAI client. The key is
// entered once and kept in sessionStorage (this tab only), never in localStorage or a cookie.
const KEY = "tunery.apiKey";

export function apiKey() { return sessionStorage.getItem(KEY) || ""; }
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(message, status, param, code) {
    super(message);
    this.status = status; this.param = param; this.code = code;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// Turn any failure into one sentence a person can act on.
async function failure(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON */ }
  const err = body && body.error ? body.error : {};
  let message = err.message || `The server answered ${resp.status} ${resp.statusText}.`;
  if (resp.status === 401) message += " Enter a valid API key at the top of the page.";
  return new ApiError(message, resp.status, err.param || null, err.code || null);
}

export async function request(method, path, { json, body, query, raw = false, signal, extraHeaders } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null) url.searchParams.set(k, v);
  const init = { method, headers: headers(extraHeaders), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (body !== undefined) {
    init.body = body;
  }
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("Cannot reach the Tunery server. Is `tunery serve` still running?", 0);
  }
  if (!resp.ok) throw await failure(resp);
  return raw ? resp : resp.json();
}

export const get = (path, query) => request("GET", path, { query });
export const post = (path, json) => request("POST", path, { json: json ?? {} });
export const del = (path) => request("DELETE", path);

export function uploadFile(file, purpose) {
  const form = new FormData();
  form.append("purpose", purpose);
  form.append("file", file, file.name);
  return request("POST", "/v1/files", { body: form });
}

// Server-sent events over fetch (EventSource cannot send an Authorization header). Calls
// onData(parsed JSON) per `data:` line until `[DONE]` or the connection ends.
export async function streamSSE(path, init, onData) {
  const resp = await request(init.method || "GET", path, { ...init, raw: true });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of chunk.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed && parsed.error) throw new ApiError(parsed.error.message || "The stream failed.", 500);
        onData(parsed);
      }
    }
  }
}

// Save a response body as a download named `filename`.
export async function download(resp, filename) {
  const blob = await resp.blob();
  saveBlob(blob, filename);
}

export function saveBlob(blob, filename) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}
