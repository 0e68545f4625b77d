"""The export feed's line as a pydantic model, and its JSON Schema for third-party systems.

`ExportRecord` describes one line of `ollama_export.jsonl` (see `export.export_records`); the values under
`ollama` reuse the stored schemas of `stages.stored`, so the feed's contract follows the stages.
`docs/export_schema.json` is generated from it:

    python -m ollama_pipeline.core.export_schema --write docs/export_schema.json
    python -m ollama_pipeline.core.export_schema --check docs/export_schema.json   # exit 1 when stale

This module only describes the feed; it never reads the database.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ollama_pipeline.core.stages import COMMON_KEYS, STAGES
from ollama_pipeline.core.stages.stored import STORED_SCHEMAS

SCHEMA_ID = "urn:ollama-pipeline:export:v1"


def _writers(key: str) -> str:
    if key in COMMON_KEYS:
        return "every stage (one entry per job type that ran)"
    return ", ".join(f"`{s.job_type}`" for s in STAGES.values() if key in s.writes) or "no stage"


OllamaValues: type[BaseModel] = create_model(
    "OllamaValues",
    __config__=ConfigDict(extra="allow", populate_by_name=True),
    __doc__="Every `ollama.*` key stored in `media_meta` for the item, parsed from its JSON text. A key is "
    "absent when no stage has written it yet. Keys not listed here may appear (written by other tools) "
    "and should be ignored by readers that do not know them.",
    **{key.removeprefix("ollama."): (model | None, Field(
        default=None, alias=key, description=f"Written by {_writers(key)}."))
       for key, model in STORED_SCHEMAS.items()},
)


class StageProvenance(BaseModel):
    """The last outcome of one stage for the item (`ollama_stage_results`)."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "failed"] = Field(description="`ok`: the stored values are this stage's last "
                                            "answer. `failed`: the last run failed; values of an earlier "
                                            "success (if any) are kept.")
    model: str | None = Field(description="The Ollama model of the stored answer, e.g. `llava:7b`.")
    version: str | None = Field(description="Prompt, schema and pipeline version of the stored answer.")
    last_success_at: str | None = Field(description="UTC time of the last success, ISO 8601 with `Z`, "
                                        "whole seconds.")
    error_code: str | None = Field(description="Stable error code of the last failure (null after a success).")


class ExportRecord(BaseModel):
    """One line of the export feed: one media item with its `ollama.*` values and stage provenance."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, title="ollama_pipeline export record")

    schema_: Literal["ollama_pipeline.core.export/v1", "ollama_pipeline.core.export/v2"] = Field(
        # = export.EXPORT_SCHEMA, export.EXPORT_SCHEMA_TEXT_IDS (a test holds them equal)
        alias="schema", description="Format and major version of this line: v1 for a gallery with integer "
        "media ids, v2 for text or UUID ids (then `media_id` and the duplicate candidates' ids are strings). "
        "A reader should refuse a major version it does not know.")
    media_id: int | str = Field(description="`media.id` of the gallery database; unique in a feed, ascending. "
                                "v1: an integer; v2: a string (a text id, or a UUID in lower-case canonical "
                                "form).")
    path: str = Field(description="`media.path`: the file's path relative to the media root, as stored.")
    hash: str | None = Field(description="`media.hash` as the gallery stores it.")
    type: str = Field(description="`media.type`, e.g. `image`.")
    width: int | None = Field(description="`media.width` in pixels.")
    height: int | None = Field(description="`media.height` in pixels.")
    quality_status: str | None = Field(description="`media.quality_status`: the quality verdict written back "
                                       "(`ok`, `needs_review`, `rejected`), or what the gallery had.")
    quality_score: float | None = Field(description="`media.quality_score` (0..1).")
    ollama: OllamaValues = Field(description="The stored `ollama.*` values, keyed by their full key.")
    stages: dict[str, StageProvenance] = Field(description="Per stage (job type) that ran for the item.")


def export_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one export line."""
    schema = ExportRecord.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def render() -> str:
    return json.dumps(export_json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the schema, or --write it to a file, or --check that a file is current."""
    parser = argparse.ArgumentParser(prog="python -m ollama_pipeline.core.export_schema", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="write the schema to FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs from the generated schema")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        return 0
    if args.check:
        current = Path(args.check).read_text(encoding="utf-8") if Path(args.check).exists() else ""
        if current != text:
            print(f"{args.check} is stale: run python -m ollama_pipeline.core.export_schema --write {args.check}",
                  file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
