"""Benchmark of one model call over loopback to the emulator: does a response stall on a delayed ACK?

    python -m ollama_pipeline.bench.emulator_calls [--calls 50] [--out bench_results/emulator_calls.json]

A server that writes headers and body separately without TCP_NODELAY makes each response wait about 40 ms
for the client's delayed ACK (Nagle). The emulator sets TCP_NODELAY on every accepted socket (the test
suite checks that setting, not a duration); this script measures the effect: the emulator in its own
process, N sequential text calls through the pipeline's client (`core.client`, the real `ollama` client
underneath), reporting the fastest, the median and the slowest in ms (target: the fastest well under the
40 ms stall, < 30 ms; the machine's load only makes some calls slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ollama_pipeline.bench.harness import EmulatorProcess, bench_settings
from ollama_pipeline.core.runner import Pipeline
from ollama_pipeline.core.stages import STAGES

STALL_MS = 40.0
TARGET_FASTEST_MS = 30.0


def measure(calls: int) -> dict[str, float | int | bool]:
    """Fastest, median and slowest ms of `calls` sequential calls to a fresh loopback emulator."""
    with EmulatorProcess(latency_ms=0) as emulator, tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline.from_settings(bench_settings(Path(tmp), emulator.base_url, concurrency=1))
        options = pipeline.options_for(STAGES["ollama_title"]).model_copy(update={"format": None})
        pipeline.client.generate_text("warm up", options)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            pipeline.client.generate_text("x", options)
            times.append((time.perf_counter() - started) * 1000.0)
        model_calls = emulator.calls()
        pipeline.client.close()
        pipeline.engine.dispose()
    fastest = min(times)
    return {"calls": calls, "model_calls": model_calls, "fastest_ms": round(fastest, 2),
            "median_ms": round(statistics.median(times), 2), "slowest_ms": round(max(times), 2),
            "target_met": fastest < TARGET_FASTEST_MS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default="bench_results/emulator_calls.json")
    args = parser.parse_args(argv)
    report = measure(args.calls)
    print(f"{report['calls']} calls: fastest {report['fastest_ms']:.1f} ms, median {report['median_ms']:.1f} ms, "
          f"slowest {report['slowest_ms']:.1f} ms (target: fastest < {TARGET_FASTEST_MS:.0f} ms, the delayed-ACK "
          f"stall is ~{STALL_MS:.0f} ms)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
