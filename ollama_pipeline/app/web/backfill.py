"""`POST /backfill`: the gallery's "Backfill these in Dagster" button (app.backfill) for its current filter.

The form carries the gallery filters; the route selects the matching items with the gallery's own SQL
(`queries.filter_conditions`), stores them as a selection and launches one Dagster backfill over their
partitions: through the Dagster webserver at `pipeline.dagster_ui_url` when it answers, else through the
`dagster-graphql` command on the local instance. The page then names the selection, the item and
partition counts and links to the backfill in the Dagster UI. CSRF and token rules are those of every POST
(web.security).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse

from ollama_pipeline.app.web import queries
from ollama_pipeline.core.stages import STAGES


def webserver_answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a dagster-webserver answers at url (its /server_info names dagster_webserver)."""
    import requests

    try:
        response = requests.get(url.rstrip("/") + "/server_info", timeout=timeout)
    except requests.RequestException:
        return False
    return response.status_code == 200 and "dagster_webserver" in response.text


def add_backfill_route(app: FastAPI, state: Any) -> None:
    @app.post("/backfill", response_class=HTMLResponse)
    def backfill(request: Request, quality: str = Form(""), policy: str = Form(""), tag: str = Form(""),
                 model: str = Form(""), stage: str = Form(""), stage_status: str = Form(""),
                 q: str = Form("")) -> HTMLResponse:
        from ollama_pipeline.app.backfill import run_backfill

        filters = queries.GalleryFilters(quality=quality.strip()[:100], policy=policy.strip()[:100],
                                         tag=tag.strip()[:255], model=model.strip()[:255],
                                         stage=stage if stage in STAGES else "",
                                         stage_status=stage_status if stage_status in queries.STAGE_STATUSES else "",
                                         q=q.strip()[:200])
        conditions = queries.filter_conditions(filters, state.engine)
        url = state.settings.pipeline.dagster_ui_url
        lines: list[str] = []
        summary = run_backfill(state.settings, None, stages=filters.stage or None, extra=conditions,
                               webserver=url if webserver_answers(url) else None, source="web", echo=lines.append)
        shown = ", ".join(f"{k}={v}" for k, v in filters.active().items()) or "every item"
        return state.render(request, "message.html", title=f"Backfill for {shown}", error=None,
                            messages=lines, results=None, media_id=None, link=summary.get("link"),
                            summary=summary)
