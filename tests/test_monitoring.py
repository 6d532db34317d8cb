"""Monitoring and deployment: a real Prometheus scrapes a live run; files are sound."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser
from orchestrator.cluster import Cluster, DistributedConfig
from orchestrator.config import TrainConfig
from orchestrator.tasks.registry import load_task
from tests.helpers import wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\bccdni_[a-z_]+")
RECORDED = re.compile(r"\bccdni:[a-z_0-9:]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@pytest.fixture(scope="module")
def live_run(ray_cluster, tmp_path_factory):
    """A distributed decoupled run that keeps training while the tests look at it."""
    root = tmp_path_factory.mktemp("monitoring")
    prometheus_dir = root / "prometheus"
    shutil.copytree(DEPLOY / "prometheus", prometheus_dir)
    config = TrainConfig(
        task="patterns",
        model="ccrnn",
        truncation=7,
        chunks=2,
        hidden_size=32,
        batch_size=25,
        granule_width=64,
        n_train=200,
        epochs=1,
    )
    task = load_task(config.task, seed=0, n_train=config.n_train)
    dist = DistributedConfig(
        schedule="decoupled",
        checkpoint_every=20,
        prometheus_sd=str(prometheus_dir / "targets" / "run.json"),
    )
    cluster = Cluster(config, dist, task, root / "run")
    cluster.start()
    cluster.save_checkpoint(0)
    thread = threading.Thread(target=cluster.run, args=(0, 100_000), daemon=True)
    thread.start()
    try:
        yield cluster, prometheus_dir
    finally:
        cluster.stop()
        thread.join(timeout=60)
        cluster.shutdown()


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return reply.read().decode()


def exported_names(cluster: Cluster) -> set[str]:
    groups = json.loads(cluster.sd_path.read_text())
    names = set()
    for group in groups:
        for target in group["targets"]:
            text = scrape(target)
            names |= {base_name(m) for m in METRIC.findall(text)}
    return names


def test_service_discovery_lists_every_actor(live_run):
    cluster, _ = live_run
    groups = json.loads(cluster.sd_path.read_text())
    roles = sorted((g["labels"]["role"], g["labels"]["chunk"]) for g in groups)
    assert roles == [("cerebellum", ""), ("chunk", "0"), ("chunk", "1")]
    assert all(g["labels"]["run"] == cluster.run_id for g in groups)


def test_dashboard_and_rules_use_only_exported_metrics(live_run):
    cluster, _ = live_run
    wait_until(
        lambda: cluster.record is not None and _step(cluster) >= 3, 60, "three steps"
    )
    names = exported_names(cluster)
    dashboard = (DEPLOY / "grafana" / "dashboards" / "ccdni.json").read_text()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"]}
    rule_exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])

    used = {base_name(m) for m in METRIC.findall(dashboard + rule_exprs)}
    assert used, "the dashboard refers to no metric"
    assert used <= names, f"not exported by any actor: {sorted(used - names)}"
    assert set(RECORDED.findall(dashboard)) <= recorded
    for required in (
        "ccdni_phase_seconds",
        "ccdni_grpc_client_seconds",
        "ccdni_grpc_server_seconds",
        "ccdni_queue_depth",
        "ccdni_prediction_cosine",
        "ccdni_messages_rejected",
        "ccdni_degraded_windows",
        "ccdni_steps",
        "ccdni_loss",
        "ccdni_feedback_staleness_windows",
        "ccdni_checkpoint_seconds",
    ):
        assert required in names, required


def _step(cluster: Cluster) -> int:
    import ray

    return ray.get(cluster.chunks[-1].progress.remote())["step"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def query(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def test_real_prometheus_scrapes_every_actor_of_a_live_run(live_run, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        message = "the prometheus binary is missing (Debian package 'prometheus')"
        if os.environ.get("CI"):
            pytest.fail(message + "; ./run.sh test installs it in CI")
        pytest.skip(message + "; ./run.sh test installs it where apt-get can")
    cluster, prometheus_dir = live_run
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={prometheus_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy():
            try:
                targets = query(base, "/api/v1/targets")["data"]["activeTargets"]
            except OSError:
                return None
            ours = [t for t in targets if t["labels"].get("run") == cluster.run_id]
            return (
                ours
                if len(ours) == 3 and all(t["health"] == "up" for t in ours)
                else None
            )

        targets = wait_until(healthy, 60, "three healthy targets")
        assert {t["labels"]["role"] for t in targets} == {"chunk", "cerebellum"}

        def samples(metric: str):
            expr = f'sum by (chunk) ({metric}{{run="{cluster.run_id}",role="chunk"}})'
            result = query(base, "/api/v1/query", query=expr)["data"]["result"]
            counts = {r["metric"]["chunk"]: float(r["value"][1]) for r in result}
            return (
                counts
                if set(counts) == {"0", "1"} and min(counts.values()) > 0
                else None
            )

        for metric in ("ccdni_phase_seconds_count", "ccdni_grpc_client_seconds_count"):
            assert wait_until(lambda m=metric: samples(m), 30, metric)

        recorded = wait_until(
            lambda: query(base, "/api/v1/query", query="ccdni:phase_seconds:p50")[
                "data"
            ]["result"],
            30,
            "the p50 recording rule",
        )
        assert any(r["metric"].get("phase") == "forward" for r in recorded)
    finally:
        process.terminate()
        process.wait(timeout=30)


def load_yaml(*parts: str):
    return yaml.safe_load((DEPLOY.joinpath(*parts)).read_text())


def test_ray_cluster_launcher_config_has_what_ray_up_needs():
    config = load_yaml("ray", "cluster.yaml")
    for key in (
        "cluster_name",
        "provider",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    assert config["provider"]["type"]
    for node in config["available_node_types"].values():
        assert "node_config" in node and "resources" in node
    assert any("run.sh setup" in c for c in config["setup_commands"])


def gpu_limits(pod_template: dict) -> list[str]:
    return [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for c in pod_template["spec"]["containers"]
    ]


def test_kuberay_manifests_ask_for_gpus_and_run_a_real_ccdni_command():
    cluster = load_yaml("kuberay", "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert "template" in spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        assert all(limit for limit in gpu_limits(group["template"]))

    job = load_yaml("kuberay", "rayjob.yaml")
    assert job["kind"] == "RayJob"
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert all(limit for limit in gpu_limits(group["template"]))
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "ccdni"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.distributed
    assert args.ray_address == "auto"
    workers = sum(
        g["replicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert workers >= args.chunks + 1  # a GPU for every chunk and the cerebellum
