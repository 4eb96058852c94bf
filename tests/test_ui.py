"""The MLflow UI, as a person sees it: a real `mlflow server` on loopback over the test's SQLite
store, opened in headless Chromium (Debian's, driven by Playwright). The screenshots are saved
under tests/artifacts/ (git-ignored)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts"

# a real component: without chromium these tests fail, unless PALM_TEST_MISSING_OK=chromium
pytestmark = pytest.mark.real_component(
    "chromium", missing=None if Path(CHROMIUM).exists() or shutil.which("chromium") else
    "Debian's chromium is not installed (make install installs it with apt-get, as root)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(registered):
    root, keys, cfg, result = registered
    port = _free_port()
    log = open(root / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root}/mlruns/mlflow.db", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
        start_new_session=True)  # its own process group: the uvicorn worker stops with it
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"mlflow server exited: {(root / 'mlflow-server.log').read_text()}")
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not answer: {(root / 'mlflow-server.log').read_text()}")
        yield url, keys, cfg, result, root
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_registered_members_show_in_the_mlflow_ui(mlflow_ui):
    from playwright.sync_api import sync_playwright

    from mlflow import MlflowClient

    from palm_tasks.registry import member_model_name, portfolio_model_name
    from palm_tasks.registry_text import ANSWERS_TABLE

    url, keys, cfg, result, root = mlflow_ui
    members, portfolios = member_model_name(cfg), portfolio_model_name(cfg)
    store = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)  # not a registry an earlier test set
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            page.goto(f"{url}/#/models", timeout=60_000)
            page.get_by_text(members, exact=True).first.wait_for(timeout=45_000)
            page.get_by_text(portfolios, exact=True).first.wait_for(timeout=10_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow-registered-models.png"), full_page=True)

            # One member's version page: its description says what it was trained for.
            version = result["member_versions"][keys[2]]
            page.goto(f"{url}/#/models/{members}/versions/{version}", timeout=60_000)
            page.get_by_text(f"PALM member {keys[2][:10]}").first.wait_for(timeout=45_000)
            text = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "mlflow-member-version.png"), full_page=True)

            # Its answers: the table logged in the version's run, opened in the artifact viewer.
            run = client.get_run(client.get_model_version(members, version).run_id)
            first = json.loads((root / "models" / "members" / keys[2] / "completions.jsonl")
                               .read_text().splitlines()[0])
            page.goto(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/"
                      f"{ANSWERS_TABLE}", timeout=60_000)
            page.get_by_text(first["prompt"]).first.wait_for(timeout=45_000)
            answers = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "mlflow-member-answers.png"), full_page=True)
        finally:
            browser.close()
    assert "of the simplex" in text and "certified" in text
    assert "answer" in answers and all(t in answers for t in cfg.traits)  # the table's columns
    assert (ARTIFACTS / "mlflow-registered-models.png").stat().st_size > 10_000
    print(f"screenshots: {ARTIFACTS}")
