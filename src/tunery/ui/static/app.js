// The dashboard shell: a hash router (#/jobs, #/new, #/jobs/<id>, #/playground, #/evaluate,
// #/models, #/logs), the API-key form and one alert area for API errors in plain words.
import { apiKey, setApiKey } from "./api.js";
import { jobsPage, jobPage } from "./jobs.js";
import { newJobPage } from "./newjob.js";
import { playgroundPage } from "./playground.js";
import { evaluatePage } from "./evaluate.js";
import { modelsPage } from "./models.js";
import { logsPage } from "./logs.js";

const main = document.getElementById("main");
const alertBox = document.getElementById("alert");
let cleanup = null;

export function showError(err) {
  if (!err || err.name === "AbortError") return;
  alertBox.textContent = err.message || String(err);
  alertBox.hidden = false;
  console.error(err);
}

export function clearError() { alertBox.hidden = true; alertBox.textContent = ""; }

const ROUTES = [
  [/^#\/jobs\/([^/]+)$/, (m) => jobPage(m[1]), "jobs"],
  [/^#\/new$/, () => newJobPage(), "new"],
  [/^#\/playground(?:\?(.*))?$/, (m) => playgroundPage(new URLSearchParams(m[1] || "")), "playground"],
  [/^#\/evaluate$/, () => evaluatePage(), "evaluate"],
  [/^#\/models$/, () => modelsPage(), "models"],
  [/^#\/logs$/, () => logsPage(), "logs"],
  [/^(#\/jobs)?$|^#\/?$/, () => jobsPage(), "jobs"],
];

// The latest route() call. Pages load asynchronously, so an earlier call (the page load, before the key
// form was submitted) can finish after a later one; it must not render over the newer page.
let routing = 0;

async function route() {
  const mine = ++routing;
  if (cleanup) { try { cleanup(); } catch { /* page already gone */ } cleanup = null; }
  clearError();
  const hash = location.hash || "#/jobs";
  for (const [re, make, page] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    for (const a of document.querySelectorAll("nav a")) {
      if (a.dataset.page === page) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    main.replaceChildren();
    try {
      const page_ = await make(m);
      if (mine !== routing) {  // a newer route() owns the page now
        if (page_.cleanup) page_.cleanup();
        return;
      }
      main.replaceChildren(page_.el);
      cleanup = page_.cleanup || null;
      document.title = `${page_.title} · Tunery`;
      main.focus({ preventScroll: true });
    } catch (err) {
      if (mine === routing) showError(err);
    }
    return;
  }
  main.replaceChildren(document.createTextNode("No such page."));
}

const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
keyInput.value = apiKey();
keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  setApiKey(keyInput.value.trim());
  route();
});

window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (e) => showError(e.reason));
route();
