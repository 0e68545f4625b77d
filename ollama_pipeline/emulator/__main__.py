"""`python -m ollama_pipeline.emulator` / `ollama-pipeline emulator`: serve the emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from ollama_pipeline.emulator.server import DEFAULT_MODELS, EmulatorConfig, EmulatorServer, Fault


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ollama-emulator", add_help=add_help,
                                description="Serve Ollama's HTTP API on loopback with fault injection.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--latency-ms", type=int, default=0, help="time each generate/chat takes")
    p.add_argument("--parallel", type=int, default=4, help="requests served at once (OLLAMA_NUM_PARALLEL)")
    p.add_argument("--max-queue", type=int, default=512, help="waiting requests before 503 (OLLAMA_MAX_QUEUE)")
    p.add_argument("--fault", action="append", default=[], metavar="KIND[:RATE]",
                   help="inject a fault: latency:MS, http_500, http_503, hang, prose, code_fence, truncated, "
                        "reasoning, bad_schema, stream_error (repeatable)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="models to serve, comma-separated")
    return p


def run(args: argparse.Namespace) -> int:
    config = EmulatorConfig(host=args.host, port=args.port, latency_ms=args.latency_ms, parallel=args.parallel,
                            max_queue=args.max_queue, faults=[Fault.parse(f) for f in args.fault],
                            models=[m.strip() for m in args.models.split(",") if m.strip()])
    server = EmulatorServer(config)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print(f"ollama emulator listening on {server.base_url}", flush=True)
    done.wait()
    stats = server.stats()
    server.stop()
    print(json.dumps({"served": stats["model_calls"], **stats}, sort_keys=True), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
