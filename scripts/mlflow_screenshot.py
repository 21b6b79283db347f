"""Open the MLflow UI in headless Chromium on a training run's metric charts and save a screenshot.

    python scripts/mlflow_screenshot.py --store .sft/mlflow/mlflow.db --mlflow .venv-mlflow/bin/mlflow \
        --experiment demo_sentiment --out docs/img/mlflow_loss_curve.png      # (= make mlflow-screenshot)

Starts `mlflow server` on the store on a free localhost port, loads the latest run of the experiment
that logged `train_loss` (`#/experiments/<id>/runs/<run>/model-metrics`), lets the page's scripts run,
and checks the rendered DOM before taking the screenshot: the page must name the run and `train_loss`
and hold a chart, or the script fails. Chromium comes from the OS packages (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
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


def chromium(url: str, binary: str, *flags: str, timeout: int = 180) -> subprocess.CompletedProcess:
    # A throwaway profile; virtual time lets the single-page app fetch and draw before the capture.
    return subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1600,1100", "--virtual-time-budget=30000", *flags, url],
                          capture_output=True, text=True, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=".sft/mlflow/mlflow.db", help="the SQLite tracking store")
    parser.add_argument("--mlflow", default=".venv-mlflow/bin/mlflow", help="full mlflow's CLI (make mlflow installs it)")
    parser.add_argument("--experiment", default="demo_sentiment")
    parser.add_argument("--out", default="docs/img/mlflow_loss_curve.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args(argv)

    uri = f"sqlite:///{Path(args.store).resolve()}"
    experiment_id, run_id, points = latest_run(uri, args.experiment)
    port = free_port()
    server = subprocess.Popen([args.mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("the MLflow server did not come up:\n" + (server.stderr.read() if server.poll() is not None else ""))
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
        dom = chromium(url, args.chromium, "--dump-dom").stdout
        problems = [what for what, ok in (("the run id", run_id in dom), ("train_loss", "train_loss" in dom),
                                          ("a chart (svg or canvas)", "<svg" in dom or "<canvas" in dom)) if not ok]
        if problems:
            sys.exit(f"{url}: the rendered page lacks {', '.join(problems)}")
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        shot = chromium(url, args.chromium, f"--screenshot={out}")
        if shot.returncode != 0 or not out.exists():
            sys.exit(f"chromium failed: {shot.stderr[-2000:]}")
        print(f"{out}: run {run_id} ({points} train_loss points) at {url}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
