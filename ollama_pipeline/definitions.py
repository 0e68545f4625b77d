"""The Dagster code location (`dagster dev -w workspace.yaml`, `dagster-webserver`, `tool.dagster`).

Importing this module reads the stage registry only; the database and Ollama are touched when a run,
sensor tick or check executes. Each run is one step (see defs.assets), so the in-process executor saves
the extra step process the multiprocess executor would start for it.
"""

from dagster import Definitions, in_process_executor

from ollama_pipeline.defs.assets import all_assets
from ollama_pipeline.defs.downstream import downstream_assets, downstream_automation_sensor
from ollama_pipeline.defs.job_sensors import ollama_refresh_schedule, queued_jobs_sensor
from ollama_pipeline.defs.resources import PipelineResource
from ollama_pipeline.defs.sensors import new_media_sensor

defs = Definitions(
    assets=[*all_assets, *downstream_assets],
    sensors=[new_media_sensor, queued_jobs_sensor, downstream_automation_sensor],
    schedules=[ollama_refresh_schedule],
    resources={"pipeline": PipelineResource()},
    executor=in_process_executor,
)
