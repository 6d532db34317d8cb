"""What serving Prometheus metrics costs: ``ccdni bench --quick`` with and without.

    python scripts/metrics_overhead.py                  # 5 pairs, rewrites the doc
    python scripts/metrics_overhead.py --pairs 3 --no-doc

Runs ``ccdni bench --quick`` with metrics on and with ``--no-metrics``, in
alternation (on, off, on, off, ...), so that drift in the machine's load hits
both alike. Every invocation writes its own ``bench.json``; this script takes,
per contender, the median steps/s over the invocations of each setting and
their ratio. The PyTorch baselines serve no metrics either way: their ratio is
the noise floor of the comparison.

Between two invocations of a short bench the speeds differ by a few per cent
by chance, so the script also times what metrics add to a step directly: one
histogram sample on a real ``ActorMetrics`` (every timeline span records one,
every gRPC call one on each end; byte counts, queue depths and the cerebellum's
statistics are read only at scrape time), times the spans a decoupled step of
the quick configuration records (counted from a threaded run of it) and its
gRPC calls (an activity send and a Predict per window).

Writes ``docs/figures/bench/metrics_overhead.{json,md}`` and rewrites the part
of ``docs/BENCHMARKS.md`` between its metrics-overhead markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "figures" / "bench"
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- metrics-overhead:begin (written by scripts/metrics_overhead.py) -->"
END = "<!-- metrics-overhead:end -->"


def ccdni_command() -> list[str]:
    local = ROOT / ".venv" / "bin" / "ccdni"
    if local.exists():
        return [str(local)]
    found = shutil.which("ccdni")
    if found is None:
        sys.exit("metrics_overhead: no ccdni command (run ./run.sh setup first)")
    return [found]


def one_run(metrics: bool, out: Path, extra: list[str]) -> dict:
    command = [*ccdni_command(), "bench", "--quick", "--out", str(out), *extra]
    if not metrics:
        command.append("--no-metrics")
    print("metrics_overhead:", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())


def speeds(result: dict) -> dict[str, float]:
    rows = {**result["schedules"], **result.get("baselines", {})}
    return {name: row["steps_per_second"] for name, row in rows.items()}


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict:
    names = list(runs["on"][0])
    table = {}
    for name in names:
        on = [run[name] for run in runs["on"]]
        off = [run[name] for run in runs["off"]]
        table[name] = {
            "on": on,
            "off": off,
            "median_on": statistics.median(on),
            "median_off": statistics.median(off),
            "ratio": statistics.median(on) / statistics.median(off),
        }
    return table


def per_step_cost() -> dict[str, float]:
    """Seconds that recording metrics adds to a decoupled step of the quick bench."""
    import time

    sys.path.insert(0, str(ROOT))
    from orchestrator import bench
    from orchestrator.tasks.registry import load_task
    from orchestrator.threaded import run_threaded
    from protos.metrics import ActorMetrics

    metrics = ActorMetrics("overhead", "chunk", 0)
    count = 200_000
    started = time.perf_counter()
    for _ in range(count):
        metrics.phase("forward", 0.003)
    sample = (time.perf_counter() - started) / count

    # A client-side call through the interceptor, with a continuation that is
    # done at once: the interceptor's own bookkeeping and its sample.
    class Done:
        def add_done_callback(self, callback):
            callback(self)

    class Details:
        method = "/ccdni.v1.Cerebellum/Predict"

    interceptor = metrics.client_interceptor()
    done, details = Done(), Details()
    started = time.perf_counter()
    for _ in range(count):
        interceptor.intercept_unary_unary(lambda d, r: done, details, None)
    call = (time.perf_counter() - started) / count

    config = bench.bench_from_args(argparse.Namespace(quick=True)).train_config()
    task = load_task(config.task, seed=config.seed, n_train=config.n_train)
    steps = 4
    run = run_threaded(config, task, "decoupled", steps)
    spans = sum(len(r.timeline.events) for r in run.runtimes) / steps
    windows = -(-task.seq_len // config.effective_truncation(task.seq_len))
    calls = 2 * windows  # an activity send and a Predict per window
    samples = spans + 2 * calls
    return {
        "sample_seconds": sample,
        "call_seconds": call,
        "spans_per_step": spans,
        "calls_per_step": calls,
        "samples_per_step": samples,
        "seconds_per_step": spans * sample + 2 * calls * call,
    }


def render(
    table: dict,
    pairs: int,
    load: tuple[list[float], list[float]],
    direct: dict[str, float],
) -> str:
    lines = [
        f"`python scripts/metrics_overhead.py`: {pairs} invocations of "
        "`ccdni bench --quick` with metrics on and as many with `--no-metrics`, "
        "alternating; steps/s is each invocation's median over its runs, and the "
        "table gives the median over invocations.",
        "",
        "| contender | serves metrics | steps/s, metrics on | steps/s, metrics off "
        "| on / off | cost |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        serves = "no (noise floor)" if name.startswith("torch-") else "yes"
        lines.append(
            f"| {name} | {serves} | {row['median_on']:.2f} "
            f"({min(row['on']):.2f}–{max(row['on']):.2f}) | {row['median_off']:.2f} "
            f"({min(row['off']):.2f}–{max(row['off']):.2f}) | {row['ratio']:.3f} "
            f"| {100 * (1 - row['ratio']):+.1f} % |"
        )
    step = 1 / table["decoupled"]["median_off"]
    lines += [
        "",
        f"Load average (1, 5, 15 min) before: {load[0]}, after: {load[1]}.",
        "",
        f"Timed directly: one histogram sample costs "
        f"{1e6 * direct['sample_seconds']:.1f} µs, one call through the timing "
        f"interceptor {1e6 * direct['call_seconds']:.1f} µs; a decoupled step of "
        f"the quick configuration records {direct['spans_per_step']:.0f} spans "
        f"and makes {direct['calls_per_step']:.0f} gRPC calls (timed on each end), "
        f"{direct['samples_per_step']:.0f} samples in all: "
        f"{1e6 * direct['seconds_per_step']:.0f} µs per step, "
        f"{100 * direct['seconds_per_step'] / step:.2f} % of the "
        f"{1000 * step:.1f} ms that step takes with metrics off.",
    ]
    return "\n".join(lines)


def rewrite_doc(section: str) -> None:
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"metrics_overhead: {DOC} lacks the markers {BEGIN!r} … {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n\n{section}\n\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="on/off pairs (5)")
    parser.add_argument("--no-doc", action="store_true", help="leave the doc alone")
    parser.add_argument(
        "bench_args", nargs="*", help="more flags for ccdni bench (after --)"
    )
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")

    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="ccdni-metrics-") as tmp:
        for pair in range(args.pairs):
            for metrics, label in ((True, "on"), (False, "off")):
                out = Path(tmp) / f"{label}-{pair}"
                runs[label].append(speeds(one_run(metrics, out, args.bench_args)))
    load_after = [round(x, 2) for x in os.getloadavg()]

    table = summarise(runs)
    direct = per_step_cost()
    section = render(table, args.pairs, (load_before, load_after), direct)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metrics_overhead.json").write_text(
        json.dumps(
            {
                "pairs": args.pairs,
                "load": [load_before, load_after],
                "table": table,
                "direct": direct,
            },
            indent=2,
        )
        + "\n"
    )
    (OUT / "metrics_overhead.md").write_text(section + "\n")
    print(section)
    if not args.no_doc:
        rewrite_doc(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
