"""Session-wide fixtures: one local Ray cluster for every test that needs one."""

from __future__ import annotations

import os

import pytest

# Ray binds to loopback, reports nothing home and needs no token here. Set before
# anything imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")  # as orchestrator.cluster does


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by the whole session (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
