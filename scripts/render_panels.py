"""Render the Grafana dashboard's key panels from a real run's Prometheus data.

Starts a short distributed decoupled run on the local Ray cluster, a Prometheus
server (Debian's package) with ``deploy/prometheus/prometheus.yml`` scraping it,
then asks Prometheus for the panels' expressions over the run and draws them.

    python scripts/render_panels.py --out docs/figures/monitoring [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.cluster import Cluster, DistributedConfig  # noqa: E402
from orchestrator.config import for_task  # noqa: E402
from orchestrator.tasks.registry import load_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PANELS = (
    "Steps per second",
    "Phase time p50",
    "Phase time p99",
    "gRPC client latency p99",
    "In-flight queue depth",
    "Predicted vs observed feedback (cosine)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def query_range(base: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode(
        {"query": expr, "start": start, "end": end, "step": 2}
    )
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as r:
        return json.loads(r.read())["data"]["result"]


def legend(template: str, labels: dict) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/monitoring")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus not found: apt-get install prometheus")

    work = Path(tempfile.mkdtemp(prefix="ccdni-panels-"))
    shutil.copytree(ROOT / "deploy" / "prometheus", work / "prometheus")
    config = for_task(
        "patterns",
        model="ccrnn",
        chunks=2,
        hidden_size=128,
        batch_size=64,
        truncation=7,
        granule_width=256,
    )
    task = load_task(config.task, seed=0)
    dist = DistributedConfig(
        schedule="decoupled",
        checkpoint_every=100,
        prometheus_sd=str(work / "prometheus" / "targets" / "run.json"),
    )
    cluster = Cluster(config, dist, task, work / "run")
    port = free_port()
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={work / 'prometheus' / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        cluster.start()
        cluster.save_checkpoint(0)
        thread = threading.Thread(target=cluster.run, args=(0, 10**6), daemon=True)
        started = time.time()
        thread.start()
        time.sleep(args.seconds)  # the run's length: Prometheus scrapes meanwhile
        end = time.time()
        cluster.stop()
        thread.join(timeout=60)

        dashboard = json.loads(
            (ROOT / "deploy" / "grafana" / "dashboards" / "ccdni.json").read_text()
        )
        panels = {p["title"]: p for p in dashboard["panels"]}
        fig, axes = plt.subplots(3, 2, figsize=(12, 9))
        for ax, title in zip(axes.flat, PANELS):
            target = panels[title]["targets"][0]
            for series in query_range(base, target["expr"], started, end):
                times = [float(t) - started for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                ax.plot(
                    times,
                    values,
                    label=legend(target["legendFormat"], series["metric"]),
                )
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("seconds into the run", fontsize=8)
            ax.legend(fontsize=6, ncol=2)
        fig.suptitle(
            f"ccdni dashboard panels from Prometheus, run {cluster.run_id} "
            "(2 chunks + cerebellum, decoupled, 2-core CPU machine)"
        )
        fig.tight_layout()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "panels.png", dpi=100)
        print(out / "panels.png")
    finally:
        cluster.shutdown()
        prometheus.terminate()
        prometheus.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
