"""Open the MLflow UI in headless Chromium on a training run's metric charts and save a screenshot.

    .venv-mlflow/bin/python scripts/mlflow_screenshot.py --store .sft/mlflow/mlflow.db \
        --experiment demo_sentiment --out docs/img/mlflow_loss_curve.png      # (= make mlflow-screenshot)

Starts `mlflow server` on the store on a free localhost port, drives headless Chromium (Selenium and
the OS's chromedriver: `apt-get install chromium chromium-driver`) to the latest run of the experiment
that logged `train_loss` (`#/experiments/<id>/runs/<run>/model-metrics`), waits until the page shows
`train_loss` with a drawn line (a plotted SVG path), and saves the screenshot; it fails when the chart
never appears. Runs in the MLflow UI's environment (`make mlflow` installs full mlflow there).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_run(uri: str, experiment: str) -> tuple[str, str, int]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"no MLflow experiment {experiment!r} in {uri} (run the pipeline first: make demo)")
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]):
        points = client.get_metric_history(run.info.run_id, "train_loss")
        if points:
            return exp.experiment_id, run.info.run_id, len(points)
    sys.exit(f"no run of {experiment!r} logged train_loss")


CHART_DRAWN = """
const text = document.body ? document.body.innerText : "";
const lines = [...document.querySelectorAll("svg path")].filter(p => (p.getAttribute("d") || "").length > 40);
return text.includes("train_loss") && lines.length > 0;
"""


def screenshot(url: str, out: Path, chromium: str, chromedriver: str, timeout: float) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        driver.get(url)
        try:
            WebDriverWait(driver, timeout, poll_frequency=1).until(lambda d: d.execute_script(CHART_DRAWN))
        except Exception:
            driver.save_screenshot(str(out.with_suffix(".failed.png")))
            sys.exit(f"{url}: no train_loss chart drawn within {timeout:.0f} s (see {out.with_suffix('.failed.png')})")
        time.sleep(2)  # let the chart's transition finish
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=".sft/mlflow/mlflow.db", help="the SQLite tracking store")
    parser.add_argument("--mlflow", default=str(Path(sys.executable).parent / "mlflow"), help="full mlflow's CLI")
    parser.add_argument("--experiment", default="demo_sentiment")
    parser.add_argument("--out", default="docs/img/mlflow_loss_curve.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver") or "chromedriver")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the chart")
    args = parser.parse_args(argv)

    uri = f"sqlite:///{Path(args.store).resolve()}"
    experiment_id, run_id, points = latest_run(uri, args.experiment)
    port = free_port()
    server_log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen([args.mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=server_log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            server_log.seek(0)
            sys.exit("the MLflow server did not come up:\n" + server_log.read()[-3000:])
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(url, out, args.chromium, args.chromedriver, args.timeout)
        print(f"{out}: run {run_id} ({points} train_loss points) at {url}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
