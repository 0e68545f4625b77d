"""The Dagster layer: a thin, declarative shell around the pipeline core, on Dagster's public API only.

`partitions` (blocks of media items, see core.partitioning), `resources` (the one Pipeline of a process),
`assets` (media plus one asset per registry stage, executed by one multi-asset step per run), `checks`
(per-stage answer checks), `sensors` (new media -> partitions + one range run), `job_sensors` (the job
queue -> runs that process it; the refresh schedule), `orphans` (killed runs marked failed) and `launch`
(in-process runs for the CLI). Importing any of them reads the stage registry only: no database, no network.
"""
