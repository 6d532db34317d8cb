#!/usr/bin/env bash
# One entry point for a fresh machine. Each command sets up what it needs first.
#
#   ./run.sh demo     set up, then run the main job (see README)
#   ./run.sh test     set up, then run the default test suite (what CI runs)
#   ./run.sh setup    only set up: a virtual environment in .venv with ccdni installed
#   ./run.sh ccdni …  set up, then run any ccdni command
#
# Environment: CCDNI_VENV (default .venv), CCDNI_PYTHON (default python3),
# CCDNI_TORCH_INDEX (a pip index URL for torch, e.g. PyTorch's CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")"

venv=${CCDNI_VENV:-.venv}
python=${CCDNI_PYTHON:-python3}
stamp="$venv/.ccdni-setup"

# Ray binds to loopback, reports nothing home, and needs no token on one machine.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export PYTHONUNBUFFERED=1

pip_install() {
    # A registry answer cut short fails pip outright; try again before giving up.
    local attempt
    for attempt in 1 2 3; do
        "$venv/bin/python" -m pip install -q --retries 5 "$@" && return 0
        echo "run.sh: pip install failed (attempt $attempt of 3)" >&2
        sleep $((attempt * 5))
    done
    return 1
}

setup() {
    if [ ! -x "$venv/bin/python" ]; then
        echo "run.sh: creating $venv with $($python --version)" >&2
        "$python" -m venv "$venv"
    fi
    local py="$venv/bin/python"
    if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
        return
    fi
    if ! "$py" -c "import torch" 2>/dev/null; then
        # A loose torch requirement on a machine without torch pulls a CUDA build
        # of several GB. Without a GPU, install the pinned CPU build explicitly;
        # with one, take the default build. A torch already present is kept.
        local index=()
        [ -n "${CCDNI_TORCH_INDEX:-}" ] && index=(--index-url "$CCDNI_TORCH_INDEX")
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            echo "run.sh: GPU found, installing torch" >&2
            pip_install "${index[@]}" "torch>=2.3"
        else
            echo "run.sh: no GPU, installing the CPU build torch==2.13.0" >&2
            pip_install "${index[@]}" "torch==2.13.0"
        fi
    fi
    pip_install -e ".[test,dev]"
    touch "$stamp"
}

ensure_prometheus() {
    # The monitoring tests start a real Prometheus (Debian's package).
    command -v prometheus >/dev/null 2>&1 && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: installing Debian's prometheus package for the tests" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null \
            || { apt-get update -q >/dev/null && \
                 DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; }
    else
        echo "run.sh: prometheus not found and cannot be installed here; the" \
             "Prometheus test will be skipped (it fails under CI=true)" >&2
    fi
}

cmd=${1:-help}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup)
        setup
        ;;
    demo)
        setup
        exec "$venv/bin/ccdni" demo "$@"
        ;;
    test)
        setup
        ensure_prometheus
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    ccdni)
        setup
        exec "$venv/bin/ccdni" "$@"
        ;;
    *)
        sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac
