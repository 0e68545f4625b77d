"""The applications on top of the core and the Dagster definitions: CLI, web UI, `ui`, demo, docs."""
