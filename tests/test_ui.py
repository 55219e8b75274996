"""The web dashboard: its JSON endpoints over HTTP, then the pages driven in a real headless Chromium
(Debian's `chromium` + `chromium-driver` through Selenium) on a tiny model: a job created from an
uploaded file reaches succeeded with its curve drawn, and the playground chats with base and
fine-tuned models side by side. Screenshots of every page go to a temporary folder, or to the folder
$TUNERY_SCREENSHOTS names (`TUNERY_SCREENSHOTS=docs/screenshots` refreshes the docs' copies)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.helpers.server import running_server
from tests.helpers.tiny import make_tiny_model_dir

KEY = "test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHOTS_ENV = "TUNERY_SCREENSHOTS"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }
        for i in range(n)
    ]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    model = make_tiny_model_dir(root / "tiny")
    with running_server(root / "data", KEY) as server:
        yield {"root": root, "model": str(model), "server": server, "base": f"http://127.0.0.1:{server.port}"}


def test_pages_static_files_and_schema(env):
    base = env["base"]
    page = httpx.get(base + "/")
    assert page.status_code == 200 and '<script type="module" src="/ui/app.js">' in page.text
    js = httpx.get(base + "/ui/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for bad in ("/ui/../serve/ui.py", "/ui/%2e%2e/serve/ui.py", "/ui/nope.js"):
        r = httpx.get(base + bad)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", bad
    paths = httpx.get(base + "/openapi.json", headers=AUTH).json()["paths"]
    for path in ("/v1/tunery/registry", "/v1/tunery/validate", "/v1/tunery/estimate", "/v1/tunery/evaluate"):
        assert path in paths
    # The JSON endpoints need the same key as the rest of the API.
    assert httpx.get(base + "/v1/tunery/registry").status_code == 401


def test_registry_validation_report_and_estimate(env):
    base, model = env["base"], env["model"]
    reg = httpx.get(base + "/v1/tunery/registry", headers=AUTH, timeout=120).json()
    lora = next(m for m in reg["methods"] if m["name"] == "lora")
    assert lora["description"] and {"name": "r", "type": "integer"}.items() <= lora["options"][0].items()
    assert "sft" in [o["name"] for o in reg["objectives"]]
    epochs = next(p for p in reg["hyperparameters"] if p["name"] == "n_epochs")
    assert epochs["openai"] and epochs["default"] == "auto" and epochs["description"]

    # Line numbers and fields of every problem, under the name the user uploaded.
    text = jsonl(chat_rows(12)).replace('"assistant"', '"robot"', 1) + "{not json\n"
    r = httpx.post(
        base + "/v1/tunery/validate", params={"filename": "mine.jsonl"}, content=text, headers=AUTH
    )
    report = r.json()
    assert r.status_code == 200 and not report["ok"] and report["path"] == "mine.jsonl"
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(1, "messages[1].role"), (13, None)]
    assert "robot" in report["errors"][0]["message"]
    bad_method = httpx.post(
        base + "/v1/tunery/validate", params={"method": "nope"}, content=text, headers=AUTH
    )
    assert bad_method.status_code == 400 and bad_method.json()["error"]["param"] == "method"

    up = httpx.post(
        base + "/v1/files",
        files={"file": ("train.jsonl", jsonl(chat_rows(12)).encode())},
        data={"purpose": "fine-tune"},
        headers=AUTH,
    ).json()
    ok = httpx.get(f"{base}/v1/tunery/files/{up['id']}/validate", headers=AUTH).json()
    assert ok["ok"] and ok["n"] == 12 and ok["path"] == "train.jsonl"

    def estimate(**body):
        return httpx.post(base + "/v1/tunery/estimate", json=body, headers=AUTH, timeout=60)

    lora_est = estimate(model=model, method="lora", training_file=up["id"]).json()
    full_est = estimate(model=model, method="full", training_file=up["id"], hyperparameters={"n_epochs": 2})
    full_est = full_est.json()
    assert lora_est["n_examples"] == 12 and lora_est["tokens_counted"] and lora_est["n_epochs"] == 8
    assert 0 < lora_est["trainable_parameters"] < lora_est["parameters"] == full_est["trainable_parameters"]
    assert (
        full_est["memory_bytes"]["gradients_and_optimizer"]
        > lora_est["memory_bytes"]["gradients_and_optimizer"]
    )
    assert full_est["n_epochs"] == 2 and full_est["total_steps"] == 24 and full_est["seconds"] > 0
    missing = estimate(model="no-such-model", n_examples=10)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert estimate(model=model).json()["error"]["param"] == "n_examples"


# ---------------------------------------------------------------------------------------------
# The browser


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/ci-services.sh)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate(driver)
        except Exception:  # elements come and go while the page re-renders
            value = None
        if value:
            return value
        time.sleep(0.25)
    alert = driver.find_element("id", "alert").text
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; alert: {alert!r}")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where screenshots go: never into the checkout unless $TUNERY_SCREENSHOTS asks for it."""
    chosen = os.environ.get(SHOTS_ENV)
    folder = Path(chosen).resolve() if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shot(driver, folder: Path, name: str) -> None:
    driver.save_screenshot(str(folder / f"{name}.png"))


def css(driver, selector: str):
    return driver.find_element("css selector", selector)


@pytest.mark.slow  # a browser, a server and a training job
def test_dashboard_in_chromium(env, browser, tmp_path, shots):
    if not os.environ.get(SHOTS_ENV):  # a test run leaves the checkout as it found it
        assert not shots.is_relative_to(Path(__file__).resolve().parents[1]), shots
    d, base, model = browser, env["base"], env["model"]
    t0 = time.time()
    marks = {}

    # A wrong key: the API's answer appears in plain words, not as a console error.
    d.get(base + "/")
    css(d, "#api-key").send_keys("wrong-key")
    css(d, "#key-form button").click()
    alert = wait(d, lambda d: css(d, "#alert").is_displayed() and css(d, "#alert").text, 10, "the alert")
    assert "Incorrect API key" in alert and "Enter a valid API key" in alert
    key = css(d, "#api-key")
    key.clear()
    key.send_keys(KEY)
    css(d, "#key-form button").click()
    wait(
        d, lambda d: not css(d, "#alert").is_displayed() and "No jobs yet" in css(d, "main").text, 10, "jobs"
    )
    assert d.execute_script("return sessionStorage.getItem('tunery.apiKey')") == KEY

    # New job: a file with a bad line gets a report naming the line; the fixed file uploads.
    d.get(base + "/#/new")
    wait(d, lambda d: css(d, "#objective").text, 120, "the registries")  # first import of methods
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl(chat_rows(10)) + '{"messages": [{"role": "user"}]}\n')
    css(d, "#training-file").send_keys(str(bad))
    report = wait(d, lambda d: css(d, "#training-report").get_attribute("data-ok") == "false", 20, "report")
    assert report and "Line 11" in css(d, "#training-report").text
    assert "null" not in css(d, "#training-report").text
    good = tmp_path / "train.jsonl"
    good.write_text(jsonl(chat_rows(10)))
    css(d, "#training-file").send_keys(str(good))
    wait(d, lambda d: "Uploaded as file-" in css(d, "#training-report").text, 20, "the upload")
    base_model = css(d, "#base-model")
    base_model.clear()
    base_model.send_keys(model)
    for name, value in (("n_epochs", "1"), ("batch_size", "2")):
        field = css(d, f"#hp-{name}")
        field.clear()
        field.send_keys(value)
    css(d, "#suffix").send_keys("ui")
    css(d, "#update-estimate").click()
    wait(d, lambda d: "5 steps" in css(d, "#estimate").text, 30, "the estimate")
    assert "Memory" in css(d, "#estimate").text
    shot(d, shots, "new-job")
    marks["new-job"] = round(time.time() - t0)
    css(d, "#create-job").click()

    # Job detail: live curve from the events stream until the job succeeds.
    wait(d, lambda d: d.execute_script("return location.hash").startswith("#/jobs/ftjob-"), 20, "job page")
    job_id = d.execute_script("return location.hash").split("/")[-1]
    status = lambda d: css(d, "#main dl.kv").get_attribute("data-status")  # noqa: E731
    wait(d, lambda d: status(d) in ("succeeded", "failed", "cancelled"), 240, "the job to finish")
    assert status(d) == "succeeded", env["server"].log()[-3000:]
    wait(d, lambda d: int(css(d, "#loss-chart").get_attribute("data-points") or 0) >= 5, 20, "the curve")
    assert "train loss: 5 points" in css(d, "#loss-chart").get_attribute("aria-label")
    wait(d, lambda d: "The job has successfully completed" in css(d, "#event-log").text, 10, "the log")
    wait(d, lambda d: ":ckpt-step-" in css(d, "main").text or "ft:tiny" in css(d, "main").text, 10, "ckpts")
    assert "Results CSV" in css(d, "main").text
    # The canvas really has ink on it (not just a data attribute).
    inked = d.execute_script(
        "const c = document.getElementById('loss-chart');"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0;"
        "for (let i = 0; i < px.length; i += 4) if (px[i + 3] && px[i + 2] > 150 && px[i] < 80) n++;"
        "return n;"
    )
    assert inked > 50
    shot(d, shots, "job-detail")
    marks["job-detail"] = round(time.time() - t0)
    fine_tuned = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers=AUTH).json()["fine_tuned_model"]

    # The Download/Export buttons' endpoint: a zip of the exported adapter with its model card.
    exported = httpx.post(
        f"{base}/v1/tunery/export", json={"model": fine_tuned, "format": "adapter"}, headers=AUTH, timeout=120
    )
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(exported.content)) as zf:
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(zf.namelist())
    refused = httpx.post(f"{base}/v1/tunery/export", json={"model": model}, headers=AUTH)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"

    d.get(base + "/#/jobs")
    wait(d, lambda d: job_id in css(d, "main table").text and "100%" in css(d, "main table").text, 20, "row")
    assert "lora" in css(d, "main table").text and "sft" in css(d, "main table").text
    shot(d, shots, "jobs")
    marks["jobs"] = round(time.time() - t0)

    # Playground: the same prompt to the base and the fine-tuned model, streamed side by side.
    from urllib.parse import quote

    d.get(f"{base}/#/playground?model={quote(model, safe='')}&model={quote(fine_tuned, safe='')}")
    wait(d, lambda d: css(d, "#prompt"), 20, "the playground")
    css(d, "#max-tokens").clear()
    css(d, "#max-tokens").send_keys("8")
    css(d, "#prompt").send_keys("What is 2 plus 2?")
    css(d, "#send").click()
    done = 'document.querySelectorAll(".msg.assistant[data-state=done]").length'
    wait(d, lambda d: d.execute_script(f"return {done}") == 2, 90, "both replies")
    columns = d.find_elements("css selector", "#chat-columns [data-model]")
    assert [c.get_attribute("data-model") for c in columns] == [model, fine_tuned]
    assert all(c.find_element("css selector", ".msg.assistant").text for c in columns)
    shot(d, shots, "playground")
    marks["playground"] = round(time.time() - t0)

    # Evaluate: the fine-tuned model on a small test file.
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(jsonl(chat_rows(3)))
    d.get(base + "/#/evaluate")
    wait(d, lambda d: css(d, "#eval-file"), 20, "the evaluate page")
    css(d, "#eval-file").send_keys(str(test_file))
    css(d, "#eval-max-new").send_keys("3")
    css(d, "#eval-extra").send_keys(model)  # the base, as a server-side directory
    for box in d.find_elements("css selector", "fieldset input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("value") == fine_tuned):
            box.click()
    css(d, "#run-eval").click()
    wait(d, lambda d: "exact match" in css(d, "#eval-results").text, 120, "the metrics table")
    results = css(d, "#eval-results").text
    assert fine_tuned in results and model in results and "Disagreements (" in results
    shot(d, shots, "evaluate")
    marks["evaluate"] = round(time.time() - t0)

    d.get(base + "/#/models")
    wait(d, lambda d: fine_tuned in css(d, "main").text, 20, "the models table")
    # The "Served by" column names the engine of each model (a tiny Llama LoRA: llama.cpp if installed).
    engine = "llama.cpp" if importlib.util.find_spec("llama_cpp") else "torch"
    assert "Served by" in css(d, "main").text and engine in css(d, "main").text
    shot(d, shots, "models")
    marks["models"] = round(time.time() - t0)

    # Phone width: the navigation and the jobs table stay usable without sideways page scrolling.
    d.set_window_size(390, 844)
    d.get(base + "/#/jobs")
    wait(d, lambda d: job_id in css(d, "main").text, 20, "the jobs table")
    width = d.execute_script("return document.documentElement.scrollWidth")
    assert width <= d.execute_script("return window.innerWidth") + 1
    shot(d, shots, "jobs-phone")
    pages = {"new-job", "job-detail", "jobs", "playground", "evaluate", "models", "jobs-phone"}
    assert {p.stem for p in shots.glob("*.png") if p.stat().st_size > 1000} >= pages
    print("seconds since start:", marks)
    d.set_window_size(1280, 1000)


@pytest.mark.slow  # heavy for the developer loop: a browser and a server
def test_logs_page_rates_corrects_and_sets_an_alias(env, browser, shots):
    """The Logs page: a stored completion is listed; thumbs down and "Edit reply" reach the feedback
    endpoint; the aliases card creates an alias."""
    d, base = browser, env["base"]

    def chat(text: str, **extra) -> dict:
        body = {"model": env["model"], "messages": [{"role": "user", "content": text}], "max_tokens": 3}
        made = httpx.post(base + "/v1/chat/completions", headers=AUTH, json={**body, **extra}, timeout=300)
        assert made.status_code == 200, made.text
        return made.json()

    chat("not stored")
    stored = chat("rate me", store=True)["id"]

    def feedback():
        got = httpx.get(f"{base}/v1/chat/completions/{stored}", headers=AUTH).json()
        return got["tunery"]["feedback"] or {}

    d.get(base + "/#/logs")
    key = css(d, "#api-key")
    key.clear()
    key.send_keys(KEY)
    css(d, "#key-form button").click()
    wait(d, lambda d: css(d, f"[data-id='{stored}']"), 60, "the stored completion's row")
    assert "rate me" in css(d, "#logs-rows").text and "not stored" not in css(d, "#logs-rows").text

    # The page re-renders its rows when its data arrives (the key form, then each refresh), so an
    # element found a moment earlier can be gone: each step finds its element afresh and retries.
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    def act(what: str, step) -> None:
        def attempt(d) -> bool:
            try:
                step(d)
                return True
            except (StaleElementReferenceException, NoSuchElementException, StopIteration):
                return False

        wait(d, attempt, 20, what)

    def row_button(text: str):
        row = css(d, f"[data-id='{stored}']")
        return next(b for b in row.find_elements("css selector", "button") if b.text == text)

    act("the thumbs down", lambda d: css(d, f"[aria-label='Thumbs down {stored}']").click())
    wait(d, lambda d: feedback().get("rating") == "down", 20, "the thumbs down to be saved")
    # The click may have reached the page's first render, which the key form replaced: its refresh
    # then redraws a detached copy. A reload shows what the server has, rendered once.
    d.refresh()
    wait(d, lambda d: css(d, f"[data-id='{stored}']").text.find("rated down") >= 0, 30, "the row to show it")
    act("the edit button", lambda d: row_button("Edit reply").click())

    def correct(d) -> None:
        editor = css(d, f"[aria-label='Corrected reply for {stored}']")
        editor.clear()
        editor.send_keys("The corrected reply")
        row_button("Save correction").click()

    act("the correction form", correct)
    wait(d, lambda d: feedback().get("corrected") == "The corrected reply", 20, "the correction")
    shot(d, shots, "logs")

    css(d, "#alias-name").send_keys("ui-router")
    css(d, "#alias-form button[type=submit]").click()
    wait(d, lambda d: "ui-router" in css(d, "[aria-labelledby=aliases-title]").text, 20, "the alias row")
    alias = httpx.get(base + "/v1/tunery/aliases/ui-router", headers=AUTH).json()
    assert alias["model"] == css(d, "#alias-model").get_attribute("value")
