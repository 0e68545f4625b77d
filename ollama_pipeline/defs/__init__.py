"""The Dagster layer: a thin, declarative shell around the pipeline core.

`partitions` (one partition per media item), `resources` (the one Pipeline of a process), `assets` (media
plus one asset per registry stage, executed by one multi-asset step per run), `checks` (per-stage answer
checks), `sensors` (new media -> partitions + one range run) and `launch` (in-process runs for the CLI).
Importing any of them reads the stage registry only: no database, no network.
"""
