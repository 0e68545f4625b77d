"""README sections generated from the registries, so the docs cannot drift from the code.

`ollama-pipeline docs` prints them; `ollama-pipeline docs --write README.md` replaces each block between
`<!-- generated:NAME -->` and `<!-- /generated:NAME -->`; `--check README.md` fails when one is stale
(the test suite runs the check). Blocks: `stages` (the stage registry), `errors` (ERROR_CODES),
`stored` (the stored value of every `ollama.*` key).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ollama_pipeline.core.errors import ERROR_CODES

CHANNEL_ORDER = ("network", "invalid_response_format", "validation", "persistence", "queue_limit")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def stages_table() -> str:
    from ollama_pipeline.core.stages import COMMON_KEYS, STAGES

    rows = ["| Job type / asset | Model | Reads | After | Writes `media_meta` | Also writes | Prompt version |",
            "|---|---|---|---|---|---|---|"]
    for stage in STAGES.values():
        writes = ", ".join(f"`{k}`" for k in stage.writes)
        rows.append(
            f"| `{stage.job_type}` | {stage.model_kind} | {', '.join(stage.inputs)} | "
            f"{', '.join(f'`{u}`' for u in stage.upstream) or '-'} | {writes} | "
            f"{', '.join(stage.writes_tables) or '-'} | `{stage.prompt_version}` |")
    common = ", ".join(f"`{k}`" for k in COMMON_KEYS)
    rows.append("")
    rows.append(f"Every stage also writes {common}: JSON objects keyed by job type (which stage ran with which "
                "model, version and when), and one row per item and stage in `ollama_stage_results` "
                "(fingerprint, model digest, tokens, durations, last error).")
    return "\n".join(rows)


def errors_table() -> str:
    rows = ["| Code | Channel | Retried | Meaning |", "|---|---|---|---|"]
    order = {name: i for i, name in enumerate(CHANNEL_ORDER)}
    for code, (channel, retryable, meaning) in sorted(ERROR_CODES.items(),
                                                      key=lambda kv: (order.get(kv[1][0], 99), kv[0])):
        rows.append(f"| `{code}` | {channel} | {'yes' if retryable else 'no'} | {_cell(meaning)} |")
    return "\n".join(rows)


def _type_text(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _type_text(defs.get(name, {}), defs)
    if "anyOf" in schema:
        return " or ".join(_type_text(s, defs) for s in schema["anyOf"])
    if "enum" in schema:
        return "|".join(str(v) for v in schema["enum"])
    if "const" in schema:
        return str(schema["const"])
    kind = schema.get("type")
    if kind == "array":
        return f"[{_type_text(schema.get('items', {}), defs)}]"
    if kind == "object" and "properties" in schema:
        inner = ", ".join(f"{k}: {_type_text(v, defs)}" for k, v in schema["properties"].items())
        return "{" + inner + "}"
    if kind == "object":
        extra = schema.get("additionalProperties")
        keys = schema.get("propertyNames", {})
        key_text = "|".join(keys["enum"]) if "enum" in keys else "string"
        return f"{{{key_text}: {_type_text(extra, defs) if isinstance(extra, dict) else 'any'}}}"
    return str(kind or "any")


def stored_table() -> str:
    from ollama_pipeline.core.stages.stored import STORED_SCHEMAS

    rows = ["| Key | Value (JSON text, sorted keys) |", "|---|---|"]
    for key, model in STORED_SCHEMAS.items():
        schema = model.model_json_schema(by_alias=True)
        rows.append(f"| `{key}` | `{_cell(_type_text(schema, schema.get('$defs', {})))}` |")
    return "\n".join(rows)


BLOCKS: dict[str, Callable[[], str]] = {"stages": stages_table, "errors": errors_table, "stored": stored_table}


def render_into(text: str) -> str:
    """README text with every generated block replaced by its current content."""
    for name, make in BLOCKS.items():
        # The body is optional so that an empty block (start marker right above the end marker) is filled too.
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(?:.*?\n)?(<!-- /generated:{name} -->)", re.S)
        body = make()
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("docs", help="print the README tables generated from the registries",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="README", help="replace the generated blocks in this file")
    group.add_argument("--check", type=Path, metavar="README", help="exit 1 when a generated block is stale")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.write or args.check:
        path = args.write or args.check
        text = path.read_text(encoding="utf-8")
        new = render_into(text)
        if args.check:
            stale = [n for n in BLOCKS if f"<!-- generated:{n} -->" not in text] or (new != text)
            if stale:
                print(f"{path}: generated blocks are stale; run `ollama-pipeline docs --write {path}`",
                      file=sys.stderr)
                return 1
            return 0
        path.write_text(new, encoding="utf-8")
        print(f"{path}: generated blocks updated")
        return 0
    for name, make in BLOCKS.items():
        print(f"<!-- generated:{name} -->\n{make()}\n<!-- /generated:{name} -->\n")
    return 0
