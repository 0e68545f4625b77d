"""The Dagster code location (`dagster dev -w workspace.yaml`, `dagster-webserver`, `tool.dagster`).

Importing this module reads the stage registry and the settings file (for what the `ollama` and `library`
resources show in the UI; no file is fine); the database and Ollama are touched when a run, sensor tick or
check executes. Each run is one step (see defs.assets), so the in-process executor saves the extra step
process the multiprocess executor would start for it.
"""

from dagster import Definitions, in_process_executor

from ollama_pipeline.defs.assets import all_assets
from ollama_pipeline.defs.downstream import downstream_assets, downstream_automation_sensor
from ollama_pipeline.defs.job_sensors import ollama_refresh_schedule, queued_jobs_sensor
from ollama_pipeline.defs.resources import PipelineResource, shown_resources
from ollama_pipeline.defs.sensors import new_media_sensor

ollama, library = shown_resources()

defs = Definitions(
    assets=[*all_assets, *downstream_assets],
    sensors=[new_media_sensor, queued_jobs_sensor, downstream_automation_sensor],
    schedules=[ollama_refresh_schedule],
    resources={"ollama": ollama, "library": library, "pipeline": PipelineResource(ollama=ollama, library=library)},
    executor=in_process_executor,
)
