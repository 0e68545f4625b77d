"""Benchmark of the CLI's start-up (issue 13 item 7): how long `ollama-pipeline --help` takes, and how long
`ollama-pipeline run` takes from the command's start to its first model request.

    python -m ollama_pipeline.bench.startup [--repeat 5] [--items 20] [--out bench_results/startup.json]

`--help` is run `--repeat` times as a child process (wall time, median and best). For `run`, a library of
`--items` small images is built in a temporary folder, the emulator serves on loopback in this process, and
`ollama-pipeline run --stages caption --force` is started `--repeat` times as a child process; the time
from its start to the first `/api/generate` or `/api/chat` the emulator receives is the figure (the first
run on a new Dagster instance, which creates the instance's tables, is reported apart). The machine's load
average is part of the report: on a busy 2-core machine every figure grows. Targets: `--help` <= 0.5 s,
first model request <= 3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_HELP_S = 0.5
TARGET_FIRST_REQUEST_S = 3.0
MODEL_PATHS = ("/api/generate", "/api/chat")


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("ollama-pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ollama_pipeline.app.cli"]


def _env(dagster_home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_PIPELINE", "DAGSTER_"))}
    if dagster_home is not None:
        env["DAGSTER_HOME"] = str(dagster_home)
    return env


def help_seconds(repeat: int) -> list[float]:
    """Wall seconds of each `ollama-pipeline --help` (checked to list every command)."""
    from ollama_pipeline.app.cli import COMMAND_MODULES

    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        proc = subprocess.run([*_cli(), "--help"], capture_output=True, text=True, env=_env(), timeout=120)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0 or any(name not in proc.stdout for name in COMMAND_MODULES):
            raise RuntimeError(f"`ollama-pipeline --help` failed or is incomplete: {proc.stdout}{proc.stderr}")
    return times


def _model_requests(server: Any) -> int:
    by_path = server.stats()["by_path"]
    return sum(int(by_path.get(path, 0)) for path in MODEL_PATHS)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_request_seconds(repeat: int, items: int, workdir: Path) -> dict[str, Any]:
    """Seconds from start to the first model request of `ollama-pipeline run` (the first run on a new
    instance apart), the CPU seconds the command had used by then (independent of the machine's load),
    and the seconds of the whole command."""
    from ollama_pipeline.app.demo_library import add_media_rows
    from ollama_pipeline.bench.harness import bench_config, dagster_home, write_config
    from ollama_pipeline.core.db.engine import init_db, make_engine
    from ollama_pipeline.emulator import EmulatorConfig, EmulatorServer

    with EmulatorServer(EmulatorConfig(host="127.0.0.1", port=0, latency_ms=0, parallel=4)) as server, \
            dagster_home(workdir, "sqlite") as home:
        data = bench_config(workdir, server.base_url)
        config = write_config(workdir / "ollama_pipeline.yaml", data)
        engine = make_engine(data["database"]["url"])
        init_db(engine)
        add_media_rows(engine, Path(data["media_root"]), items)
        engine.dispose()
        firsts: list[float] = []
        cpus: list[float] = []
        totals: list[float] = []
        for _ in range(repeat + 1):
            before = _model_requests(server)
            started = time.perf_counter()
            proc = subprocess.Popen([*_cli(), "--config", str(config), "run", "--stages", "caption", "--force"],
                                    cwd=workdir, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            first = cpu = None
            while proc.poll() is None and first is None:  # ends with the run at the latest
                if _model_requests(server) > before:
                    first = time.perf_counter() - started
                    cpu = _cpu_seconds(proc.pid)
                    break
                time.sleep(0.002)
            out, err = proc.communicate(timeout=600)
            total = time.perf_counter() - started
            if proc.returncode != 0 or first is None:
                raise RuntimeError(f"`ollama-pipeline run` exited {proc.returncode} "
                                   f"({'no' if first is None else 'a'} model request):\n{out[-2000:]}{err[-2000:]}")
            firsts.append(first)
            cpus.append(cpu or 0.0)
            totals.append(total)
        return {"cold": firsts[0], "cold_cpu": cpus[0], "firsts": firsts[1:], "cpus": cpus[1:],
                "totals": totals[1:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ollama_pipeline.bench.startup", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--items", type=int, default=20, help="items of the run's library (default 20)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    helps = help_seconds(args.repeat)
    with tempfile.TemporaryDirectory(prefix="ollama_startup_") as tmp:
        run = first_request_seconds(args.repeat, args.items, Path(tmp))
    firsts, totals, cold = run["firsts"], run["totals"], run["cold"]
    report = {
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "help_s": {"median": round(statistics.median(helps), 3), "best": round(min(helps), 3),
                   "all": [round(x, 3) for x in helps], "target": TARGET_HELP_S},
        "run_first_request_s": {"median": round(statistics.median(firsts), 3), "best": round(min(firsts), 3),
                                "all": [round(x, 3) for x in firsts], "cold_instance": round(cold, 3),
                                "target": TARGET_FIRST_REQUEST_S},
        "run_cpu_until_first_request_s": {"median": round(statistics.median(run["cpus"]), 3),
                                          "cold_instance": round(run["cold_cpu"], 3)},
        "run_total_s": {"median": round(statistics.median(totals), 3), "items": args.items, "stage": "caption"},
    }
    ok_help = report["help_s"]["median"] <= TARGET_HELP_S
    ok_first = report["run_first_request_s"]["median"] <= TARGET_FIRST_REQUEST_S
    print(f"load average {report['load_average_before']} -> {report['load_average_after']} on {report['cpus']} CPU(s)")
    print(f"ollama-pipeline --help          median {report['help_s']['median']:.3f} s, best "
          f"{report['help_s']['best']:.3f} s (target <= {TARGET_HELP_S} s) {'ok' if ok_help else 'MISSED'}")
    print(f"run: first model request after  median {report['run_first_request_s']['median']:.3f} s, best "
          f"{report['run_first_request_s']['best']:.3f} s, new instance {cold:.3f} s "
          f"(target <= {TARGET_FIRST_REQUEST_S} s) {'ok' if ok_first else 'MISSED'}")
    print(f"run: CPU used by then          median {report['run_cpu_until_first_request_s']['median']:.3f} s "
          "(what the wall time approaches on an idle machine)")
    print(f"run: whole command ({args.items} items, caption) median {report['run_total_s']['median']:.3f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if ok_help and ok_first else 1


if __name__ == "__main__":
    sys.exit(main())
