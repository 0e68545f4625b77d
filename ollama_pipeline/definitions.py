"""The Dagster code location (`dagster dev -w workspace.yaml`, `dagster-webserver`, `tool.dagster`).

Importing this module reads the stage registry and the settings file (for what the `ollama` and `library`
resources show in the UI; no file is fine); the database and Ollama are touched when a run, sensor tick or
check executes. Each run is one step (see defs.assets), so the in-process executor saves the extra step
process the multiprocess executor would start for it.
"""

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from ollama_pipeline.defs.assets import all_assets
from ollama_pipeline.defs.downstream import downstream_assets, downstream_automation_sensor
from ollama_pipeline.defs.job_sensors import ollama_refresh_schedule, queued_jobs_sensor
from ollama_pipeline.defs.partitions import media_partitions
from ollama_pipeline.defs.resources import PipelineResource, shown_resources
from ollama_pipeline.defs.sensors import library_asset_keys, new_media_sensor

ollama, library = shown_resources()

# One run per block of media (`dagster job backfill -j ollama_library_blocks --partitions ...`): how the
# cluster demo spreads a library over Celery workers; the assets' own backfills stay one run.
library_blocks_job = define_asset_job(
    "ollama_library_blocks", selection=AssetSelection.assets(*library_asset_keys), partitions_def=media_partitions,
    description="media and every stage for one block of media items (one run per partition)")

defs = Definitions(
    assets=[*all_assets, *downstream_assets],
    jobs=[library_blocks_job],
    sensors=[new_media_sensor, queued_jobs_sensor, downstream_automation_sensor],
    schedules=[ollama_refresh_schedule],
    resources={"ollama": ollama, "library": library, "pipeline": PipelineResource(ollama=ollama, library=library)},
    executor=in_process_executor,
)
