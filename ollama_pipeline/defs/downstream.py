"""Unpartitioned assets below the eight stage assets (§2 UI/Downstream): the export feed and the report.

- `ollama_export` writes the JSON Lines feed for third-party systems with `export.write_export` (format:
  docs/export_format.md) and reports its path, item count, size and SHA-256; the SHA-256 is also its data
  version, so an unchanged library shows an unchanged version.
- `ollama_report` summarises the library with `report.build_report` (pandas): Markdown tables and
  numeric key figures the Dagster UI plots across materializations; it also writes
  `reports/ollama_report.md` and `.json` beside `exports/`.

Both read the whole library, so they depend on every stage asset (all partitions) and are not
partitioned. They are kept fresh on a schedule, not after every run (the feed of 100,000 items takes
about 23 s): `DOWNSTREAM_CONDITION` (declarative automation) requests them at a tick of `DOWNSTREAM_CRON`
when a stage asset was updated since they were last materialized, or when they were never materialized;
`downstream_automation_sensor` (running by default; needs the Dagster daemon, which `dagster dev` starts)
evaluates it. `make demo` materializes both once at its end. They are kept out of `assets.all_assets`, whose implicit job `launch.materialize_stages`
runs over partition ranges; `definitions.py` adds them. The asset bodies call the core only.
"""

import hashlib
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DataVersion,
    DefaultSensorStatus,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ollama_pipeline.core.db.gallery import require_gallery
from ollama_pipeline.core.export import EXPORT_SCHEMA, export_schema_for, write_export
from ollama_pipeline.core.report import (
    REPORT_FORMAT,
    SECTIONS,
    TOP_TAGS,
    build_report,
    default_report_dir,
    key_figures,
    write_report,
)
from ollama_pipeline.defs.assets import ASSET_GROUP, ollama_stage_assets
from ollama_pipeline.defs.resources import PipelineResource

DOWNSTREAM_GROUP = ASSET_GROUP  # the code location's one asset group (defs.assets)
STAGE_KEYS = [spec.key for spec in ollama_stage_assets]
DOWNSTREAM_CRON = "0 * * * *"  # hourly, on the hour (UTC)


def refresh_on_cron(cron: str) -> AutomationCondition:
    """At a tick of `cron`: request the asset when any dependency was updated since the asset was last
    requested or updated, or when it has never been materialized; never while it or a dependency is in a
    run (then the next tick). Unlike `AutomationCondition.on_cron`, one updated stage is enough (not every
    stage since the tick), and an update after the tick waits for the next tick."""
    return (
        AutomationCondition.cron_tick_passed(cron)  # only on the evaluation the tick falls in
        & (AutomationCondition.any_deps_updated() | AutomationCondition.missing()).since_last_handled()
        & ~AutomationCondition.in_progress()
        & ~AutomationCondition.any_deps_in_progress()
    ).with_label(f"refresh_on_cron({cron})")


DOWNSTREAM_CONDITION = refresh_on_cron(DOWNSTREAM_CRON)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@asset(
    name="ollama_export", group_name=DOWNSTREAM_GROUP, deps=STAGE_KEYS, kinds={"json"},
    code_version=EXPORT_SCHEMA, automation_condition=DOWNSTREAM_CONDITION,
    description="The export feed for third-party systems (§2): `exports/ollama_export.jsonl`, one JSON object "
    "per media item with every `ollama.*` value and per-stage provenance, ordered by media id, replaced "
    "atomically. Byte-identical for an unchanged library; its data version is the file's SHA-256. "
    "Format: docs/export_format.md.",
)
def ollama_export(context: AssetExecutionContext, pipeline: PipelineResource) -> MaterializeResult:
    """Write the feed; metadata: path, items, bytes, sha256, schema."""
    path, items = write_export(pipeline.settings())
    digest = file_sha256(path)
    size = path.stat().st_size
    context.log.info(f"export feed: {items} item(s), {size:,} bytes, sha256 {digest[:12]} -> {path}")
    return MaterializeResult(
        metadata={"path": MetadataValue.path(str(path)), "items": MetadataValue.int(items),
                  "bytes": MetadataValue.int(size), "sha256": MetadataValue.text(digest),
                  "schema": MetadataValue.text(export_schema_for(require_gallery(pipeline.pipeline().engine).id_type))},
        data_version=DataVersion(digest))


@asset(
    name="ollama_report", group_name=DOWNSTREAM_GROUP, deps=STAGE_KEYS, kinds={"pandas"},
    code_version=REPORT_FORMAT, automation_condition=DOWNSTREAM_CONDITION,
    description=f"A report of the whole library: top {TOP_TAGS} normalized tags, quality verdicts and score "
    "distribution, named score distributions, policy outcomes, and per stage the items by status with "
    "latency and tokens. Shown as Markdown tables and key figures (plotted across materializations); also "
    "written to `reports/ollama_report.md` and `reports/ollama_report.json`.",
)
def ollama_report(context: AssetExecutionContext, pipeline: PipelineResource) -> MaterializeResult:
    """Build the report from the library DB; metadata: one Markdown table per section, key figures, files."""
    core = pipeline.pipeline()
    report = build_report(core.engine)
    md_path, json_path = write_report(report, default_report_dir(core.settings))
    metadata: dict[str, MetadataValue] = {
        f"{name}_table": MetadataValue.md(render(report)) for name, render in SECTIONS.items()}
    for name, value in key_figures(report).items():
        metadata[name] = MetadataValue.int(value) if isinstance(value, int) else MetadataValue.float(value)
    metadata.update({"report_md": MetadataValue.path(str(md_path)), "report_json": MetadataValue.path(str(json_path)),
                     "report_format": MetadataValue.text(REPORT_FORMAT)})
    context.log.info(f"report: {report.items} item(s) -> {md_path}")
    return MaterializeResult(metadata=metadata)


downstream_assets: list[AssetsDefinition] = [ollama_export, ollama_report]

downstream_automation_sensor = AutomationConditionSensorDefinition(
    "ollama_downstream_automation", target=AssetSelection.assets(*downstream_assets),
    default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=60,
    description=f"Keeps ollama_export and ollama_report fresh: at each tick of `{DOWNSTREAM_CRON}` (UTC) it "
    "requests them when a stage asset changed since their last materialization.",
)
