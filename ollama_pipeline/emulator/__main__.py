"""`python -m ollama_pipeline.emulator` / `ollama-pipeline emulator`: serve the emulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from ollama_pipeline.emulator.profiles import HOSTS
from ollama_pipeline.emulator.server import EmulatorConfig, EmulatorServer, Fault


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ollama-emulator", add_help=add_help,
                                description="Serve Ollama's HTTP API (v0.32.15) on loopback, with model profiles, "
                                            "a cost model and fault injection.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--profile", choices=sorted(HOSTS), default=None,
                   help="host profile (default: flat, every call costs --latency-ms and nothing else)")
    p.add_argument("--time-scale", type=float, default=None,
                   help="run modeled time this many times faster than real time (default 1)")
    p.add_argument("--latency-ms", type=float, default=0, help="flat profile: time each generate/chat takes")
    p.add_argument("--parallel", type=int, default=None, help="OLLAMA_NUM_PARALLEL (flat default 4)")
    p.add_argument("--max-queue", type=int, default=None, help="OLLAMA_MAX_QUEUE: requests waiting for a load")
    p.add_argument("--max-loaded-models", type=int, default=None, help="OLLAMA_MAX_LOADED_MODELS")
    p.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS", help="OLLAMA_KEEP_ALIVE")
    p.add_argument("--vram-gib", type=float, default=None, help="GPU memory of the emulated host")
    p.add_argument("--fault", action="append", default=[], metavar="KIND[:RATE]",
                   help="inject a fault: latency:MS, http_500, http_503, hang, prose, code_fence, truncated, "
                        "reasoning, bad_schema, stream_error (repeatable)")
    p.add_argument("--models", default=None, help="models to serve, comma-separated (default: the profile's)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        faults = [Fault.parse(f) for f in args.fault]
        config = EmulatorConfig(
            host=args.host, port=args.port, latency_ms=args.latency_ms, parallel=args.parallel,
            max_queue=args.max_queue, faults=faults, profile=args.profile, time_scale=args.time_scale,
            keep_alive_s=args.keep_alive, max_loaded_models=args.max_loaded_models, vram_gib=args.vram_gib,
            models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None)
        server = EmulatorServer(config)
    except (ValueError, KeyError) as exc:
        print(f"ollama-emulator: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ollama-emulator: error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    print(f"ollama emulator (profile {server.config.host_profile().name}) listening on {server.base_url}", flush=True)
    done.wait()
    stats = server.stats()
    server.stop()
    print(json.dumps({"served": stats["model_calls"], **{k: v for k, v in stats.items() if k != "models"}},
                     sort_keys=True), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
