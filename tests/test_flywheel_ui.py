"""The Logs page's Compare card in a real headless Chromium (issue 27, section 4: "the dashboard
shows the comparison"): an operator picks the old and the new model, a held-out file and a sample
size, and sees the report of POST /v1/tunery/compare; the alias switch beside it then points at the
new model. Two tiny models registered on a real server answer."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers.server import running_server
from tests.helpers.tiny import make_tiny_model_dir
from tests.test_ui import browser, css, wait  # noqa: F401 (browser is a fixture)

KEY = "test-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LABELS = {"good food": "positive", "cold soup": "negative", "nice staff": "positive", "rude": "negative"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tunery.jobs.store import Store
    from tunery.models.registry import inspect_source
    from tunery.serve.model_registry import ModelRegistry

    root = tmp_path_factory.mktemp("flywheel-ui")
    with running_server(root / "data", KEY) as server:
        store = Store(server.data_dir)
        try:
            for name, seed in (("tiny-old", 0), ("tiny-new", 1)):
                path = make_tiny_model_dir(root / name, seed=seed)
                ModelRegistry(store).add(name, inspect_source(str(path)))
        finally:
            store.close()
        rows = [
            {
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "task": "sentiment",
            }
            for q, a in LABELS.items()
        ]
        made = httpx.post(
            f"http://127.0.0.1:{server.port}/v1/files",
            headers=AUTH,
            data={"purpose": "fine-tune"},
            files={"file": ("support.test.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())},
        )
        assert made.status_code == 200, made.text
        yield {"base": f"http://127.0.0.1:{server.port}", "file": made.json()["id"]}


def login(d) -> None:
    key = css(d, "#api-key")
    key.clear()
    key.send_keys(KEY)
    css(d, "#key-form button").click()


@pytest.mark.slow  # heavy for the developer loop: a browser and a server
def test_compare_card_shows_the_report_and_readies_the_alias_switch(env, browser):  # noqa: F811
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(env["base"] + "/#/logs")
    login(d)
    wait(d, lambda d: env["file"] in css(d, "#compare-file").text, 60, "the compare form")

    def fill(d) -> bool:
        Select(css(d, "#compare-old")).select_by_value("tiny-old")
        Select(css(d, "#compare-new")).select_by_value("tiny-new")
        Select(css(d, "#compare-file")).select_by_value(env["file"])
        size = css(d, "#compare-sample")
        size.clear()
        size.send_keys("3")
        css(d, "#compare-max-new").send_keys("2")
        css(d, "#run-compare").click()
        return True

    wait(d, fill, 20, "the form to fill")
    report = wait(d, lambda d: css(d, "#compare-report").text, 120, "the compare report")
    assert "3 examples (a sample of 4), classification" in report
    assert "tiny-old" in report and "tiny-new" in report and "Per task" in report and "sentiment" in report
    assert not css(d, "#compare-busy").is_displayed() and css(d, "#run-compare").is_enabled()
    # The alias switch beside it now offers the new model.
    assert css(d, "#alias-model").get_attribute("value") == "tiny-new"


def test_new_job_form_sets_classification_metrics(env, browser, tmp_path):  # noqa: F811
    """Section 5: `compute_classification_metrics` (and the positive class) from the New-job form
    reach the job, where the API shows them under `tunery`."""
    d = browser
    d.get(env["base"] + "/#/new")
    login(d)
    wait(d, lambda d: css(d, "#objective").text, 120, "the registries")
    train = tmp_path / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"{q} {i}"}, {"role": "assistant", "content": a}]}
        for i in range(3)
        for q, a in LABELS.items()
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    css(d, "#training-file").send_keys(str(train))
    wait(d, lambda d: "Uploaded as file-" in css(d, "#training-report").text, 30, "the upload")
    model = css(d, "#base-model")
    model.clear()
    model.send_keys("tiny-old")
    css(d, "#compute-classification-metrics").click()
    css(d, "#classification-positive-class").send_keys("positive")
    css(d, "#create-job").click()
    wait(d, lambda d: d.execute_script("return location.hash").startswith("#/jobs/ftjob-"), 30, "job page")
    job_id = d.execute_script("return location.hash").split("/")[-1]
    job = httpx.get(f"{env['base']}/v1/fine_tuning/jobs/{job_id}", headers=AUTH).json()
    httpx.post(f"{env['base']}/v1/fine_tuning/jobs/{job_id}/cancel", headers=AUTH)
    assert job["tunery"]["compute_classification_metrics"] is True
    assert job["tunery"]["classification_positive_class"] == "positive"
