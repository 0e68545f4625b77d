"""Job-queue commands of the `ollama-pipeline` CLI: enqueue, process, and `jobs list|retry|cancel|counts`.

`register(subparsers)` adds them to the main parser (`ollama_pipeline.app.cli`). Handlers take the parsed
arguments, load the configuration from the global `--config`, and return the exit code: 0 on success,
1 when `process` left jobs failed; typed errors propagate to `cli.main`, which prints one line
`error [channel/code]: message` and exits 2. All queue logic lives in `ollama_pipeline.core.queue.store`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from ollama_pipeline.core.config import load_settings
from ollama_pipeline.core.errors import ValidationError
from ollama_pipeline.core.queue.models import JOB_STATUSES, Job, JobOutcome, ProcessSummary
from ollama_pipeline.core.selection import (
    non_negative_int,
    parse_for_library,
    parse_job_types,
    positive_int,
)

if TYPE_CHECKING:
    from ollama_pipeline.core.runner import Pipeline


def _pipeline(args: argparse.Namespace) -> Pipeline:
    from ollama_pipeline.core.db.gallery import require_gallery
    from ollama_pipeline.core.runner import Pipeline

    pipeline = Pipeline.from_settings(load_settings(getattr(args, "config", None)))
    require_gallery(pipeline.engine)  # a gallery without a required column stops here, with the report
    return pipeline


def _reaped(pipeline: Pipeline) -> Pipeline:
    """Runs killed without a word (stale heartbeat) are marked failed before the queue is shown."""
    from ollama_pipeline.app.orchestrate import reap_orphans

    for line in reap_orphans(pipeline):
        print(line, file=sys.stderr)
    return pipeline


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if args.payload:
        try:
            loaded = json.loads(args.payload)
        except ValueError as exc:
            raise ValidationError(f"--payload is not valid JSON: {exc}", code="validation.payload") from None
        if not isinstance(loaded, dict):
            raise ValidationError("--payload must be a JSON object", code="validation.payload")
        payload.update(loaded)
    if args.force:
        payload["force"] = True
    if args.priority is not None:
        payload["priority"] = args.priority
    if args.model:
        payload["model"] = args.model
    return payload


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Queue jobs: one job type (or every stage) for a media selection (ids, ranges, lists, all).

    The selection is validated before anything is queued; ranges are resolved in SQL page by page. A
    typed error part-way (a queue limit) prints exactly how far the enqueue got and exits 2."""
    from ollama_pipeline.core.queue.bulk import enqueue_selection
    from ollama_pipeline.core.stages import STAGES

    targets = list(args.targets)
    if args.all_stages:
        job_types = list(STAGES)
    else:
        if len(targets) < 2:
            raise ValidationError("usage: enqueue JOB_TYPE MEDIA [MEDIA ...] (or --all-stages MEDIA ...); "
                                  "media: 7, 1-500, 3,5,9 or all", code="validation.payload")
        job_types = parse_job_types(targets.pop(0))
    payload = _payload(args)
    pipeline = _pipeline(args)
    selection = parse_for_library(targets, pipeline.engine)

    def show(result: Any) -> None:
        print(f"{result.status} job {result.job_id}: {result.job_type} for media {result.media_id}")

    check = selection.check(pipeline.engine)
    if check.note():
        print(check.note(), file=sys.stderr)
    report = enqueue_selection(pipeline, job_types, selection, payload, on_result=None if args.quiet else show)
    print(report.render())
    if report.error is not None:
        print(f"error [{report.error['channel']}/{report.error['code']}]: {report.error['message']}", file=sys.stderr)
        return 2
    return 0


class _PlainProgress:
    """`processed 10/200 (5.0/s, eta 38s)` lines for logs and pipes: every 10 jobs, at most every 2 s."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = self.last = time.perf_counter()

    def __call__(self, outcome: JobOutcome, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and done % 10 and now - self.last < 2.0:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
        print(f"processed {done}/{total} ({rate:.1f}/s, eta {eta})", file=self.out, flush=True)


class _BarProgress:
    """A tqdm bar with rate and ETA, for a terminal."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="job", dynamic_ncols=True)

    def __call__(self, outcome: JobOutcome, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        self.bar.update(done - self.bar.n)
        if outcome.error:
            self.bar.set_postfix_str(f"last error {outcome.error.get('code')}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _outcome_line(outcome: JobOutcome) -> str:
    if not outcome.claimed:
        return f"job {outcome.job_id}: not claimable (status {outcome.status})"
    line = (f"job {outcome.job_id}: {outcome.job_type} for media {outcome.media_id} -> {outcome.status} "
            f"(attempt {outcome.attempt}, {outcome.item_status or '-'}, {outcome.duration_ms:.0f} ms)")
    if outcome.error:
        line += f" [{outcome.error.get('channel')}/{outcome.error.get('code')}] {outcome.error.get('message')}"
    return line


def cmd_process(args: argparse.Namespace) -> int:
    """Process one job (--job) or drain the queue with a thread pool, showing progress."""
    from ollama_pipeline.core.queue.store import process_jobs, process_ollama_job

    job_types = parse_job_types(args.type) if args.type is not None else None
    pipeline = _pipeline(args)
    if args.job is not None:
        outcome = process_ollama_job(pipeline, args.job, worker=args.worker)
        print(_outcome_line(outcome))
        return 0 if outcome.status == "done" or not outcome.claimed else 1
    bar: _BarProgress | None = _BarProgress() if sys.stdout.isatty() and not args.no_progress else None
    progress = bar if bar is not None else (None if args.no_progress else _PlainProgress(sys.stdout))
    try:
        summary: ProcessSummary = process_jobs(pipeline, args.worker, limit=args.limit,
                                               concurrency=args.concurrency, job_types=job_types,
                                               progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"processed {summary.processed} job(s) in {summary.seconds:.1f}s ({summary.rate:.1f}/s): "
          f"{summary.succeeded} done, {summary.retried} to retry, {summary.failed} failed"
          + (f", {summary.lease_lost} lease lost" if summary.lease_lost else "")
          + (f", {summary.errors} not recorded" if summary.errors else ""))
    return 1 if summary.failed or summary.errors else 0


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds") + "Z" if value is not None else "-"


def _job_dict(job: Job) -> dict[str, Any]:
    data = job.model_dump(mode="json")
    for key in ("lease_until", "created_at", "updated_at", "started_at", "finished_at"):
        value = getattr(job, key)
        data[key] = _iso(value) if value is not None else None
    return data


def cmd_jobs_list(args: argparse.Namespace) -> int:
    """Print the newest jobs as a table or as JSON."""
    from ollama_pipeline.core.queue.store import list_jobs

    job_type = parse_job_types(args.type)[0] if args.type is not None else None
    pipeline = _pipeline(args)
    media = parse_for_library(args.media, pipeline.engine) if args.media is not None else None
    jobs = list_jobs(_reaped(pipeline), status=args.status, job_type=job_type, media_id=media,
                     limit=args.limit)
    if args.json:
        print(json.dumps([_job_dict(j) for j in jobs], indent=2))
        return 0
    print(f"{'id':>7}  {'job_type':<24} {'media':>7}  {'status':<9} {'att':>5} {'prio':>4}  {'updated':<20}  error")
    for j in jobs:
        error = f"{j.error_code}: {j.error_message}"[:80] if j.error_code else ""
        print(f"{j.id:>7}  {j.job_type:<24} {j.media_id:>7}  {j.status:<9} {j.attempts:>2}/{j.max_attempts:<2} "
              f"{j.priority:>4}  {_iso(j.updated_at):<20}  {error}")
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    """Requeue a failed or cancelled job."""
    from ollama_pipeline.core.queue.store import retry_job

    job = retry_job(_pipeline(args), args.job_id)
    print(f"job {job.id} requeued: {job.job_type} for media {job.media_id}")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    """Cancel a queued job."""
    from ollama_pipeline.core.queue.store import cancel_job

    job = cancel_job(_pipeline(args), args.job_id)
    print(f"job {job.id} cancelled: {job.job_type} for media {job.media_id}")
    return 0


def cmd_jobs_counts(args: argparse.Namespace) -> int:
    """Print jobs per status, overall and per job type."""
    from ollama_pipeline.core.queue.store import queue_counts

    counts = queue_counts(_reaped(_pipeline(args)))
    if args.json:
        print(counts.model_dump_json(indent=2))
        return 0
    print(f"{'job_type':<26}" + "".join(f"{s:>10}" for s in JOB_STATUSES))
    for job_type, row in counts.by_type.items():
        print(f"{job_type:<26}" + "".join(f"{row.get(s, 0):>10}" for s in JOB_STATUSES))
    print(f"{'total':<26}" + "".join(f"{counts.total.get(s, 0):>10}" for s in JOB_STATUSES))
    return 0


def cmd_jobs_problems(args: argparse.Namespace) -> int:
    """Print the items whose file cannot be used: missing, unreadable, too large or of an unsupported type."""
    from ollama_pipeline.core.db import repository

    if args.limit < 1:
        raise ValidationError(f"--limit must be at least 1, not {args.limit}", code="validation.payload")
    rows = repository.media_problems(_pipeline(args).engine, limit=args.limit)
    if args.json:
        print(json.dumps([{**r, "reason": r["error_code"].removeprefix("validation."),
                           "updated_at": _iso(r["updated_at"])} for r in rows], indent=2))
        return 0
    if not rows:
        print("no media problems: every file the pipeline looked at could be used")
        return 0
    print(f"{'media':>7}  {'reason':<24} {'status':<8} {'seen':<20}  path: message")
    for r in rows:
        print(f"{r['media_id']:>7}  {r['error_code'].removeprefix('validation.'):<24} {r['status']:<8} "
              f"{_iso(r['updated_at']):<20}  {r['path']}: {r['error_message']}"[:240])
    print(f"{len(rows)} item(s) to fix; a run reports them as skipped until the file or the media row changes")
    return 0


def register(subparsers: Any) -> None:
    """Add `enqueue`, `process` and `jobs ...` to the main parser's subcommands."""
    from ollama_pipeline.app.cli import arg_type

    positive = {name: arg_type(positive_int, name) for name in ("--limit", "--concurrency", "--job", "JOB_ID")}
    p = subparsers.add_parser("enqueue", help="queue jobs for media items (deduplicated against active jobs)",
                              description="enqueue JOB_TYPE MEDIA [MEDIA ...]; or --all-stages MEDIA ... "
                                          "Media: 7, 1-500, 3,5,9 or all.")
    p.add_argument("targets", nargs="+", metavar="JOB_TYPE MEDIA", help="job type, then media ids or ranges")
    p.add_argument("--all-stages", action="store_true", help="one job per stage; every argument is a media id")
    p.add_argument("--payload", help='job payload as JSON, e.g. \'{"force": true, "priority": 50}\'')
    p.add_argument("--force", action="store_true", help="call the model even when nothing changed")
    p.add_argument("--priority", type=arg_type(non_negative_int, "--priority"), help="0..100, higher runs first")
    p.add_argument("--model", help="use this model instead of the configured one")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(handler=cmd_enqueue)

    p = subparsers.add_parser("process", help="process queued jobs (a worker) or one job")
    p.add_argument("--limit", type=positive["--limit"], help="stop after claiming this many jobs")
    p.add_argument("--worker", help="worker name stored on claimed jobs (default host:pid)")
    p.add_argument("--concurrency", type=positive["--concurrency"], help="jobs at once (default pipeline.concurrency)")
    p.add_argument("--job", type=positive["--job"], help="process only this job id")
    p.add_argument("--type", action="append", help="only this job type (repeatable, or separated by commas)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(handler=cmd_process)

    jobs = subparsers.add_parser("jobs", help="inspect and manage the job queue")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    p = jsub.add_parser("list", help="the newest jobs first")
    p.add_argument("--status", choices=JOB_STATUSES)
    p.add_argument("--type", help="job type")
    p.add_argument("--media", help="media: 7, 1-500, 3,5,9 or all")
    p.add_argument("--limit", type=positive["--limit"], default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_jobs_list)
    p = jsub.add_parser("retry", help="requeue a failed or cancelled job (attempts reset)")
    p.add_argument("job_id", type=positive["JOB_ID"])
    p.set_defaults(handler=cmd_jobs_retry)
    p = jsub.add_parser("cancel", help="cancel a queued job")
    p.add_argument("job_id", type=positive["JOB_ID"])
    p.set_defaults(handler=cmd_jobs_cancel)
    p = jsub.add_parser("problems", help="items to fix: file missing, unreadable or of an unsupported media type")
    p.add_argument("--limit", type=positive["--limit"], default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_jobs_problems)
    p = jsub.add_parser("counts", help="jobs per status and job type")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_jobs_counts)
