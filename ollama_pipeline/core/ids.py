"""Media ids of any gallery: integers (the seed's `media.id`), text, or UUIDs (`library.id_type`).

A media id travels through the pipeline as the value the gallery's driver returns: `int` for integer
ids, `str` for text ids and for UUIDs (reflected with `as_uuid=False`, lower-case canonical text). The
pipeline's own `media_id` columns hold the same type as the gallery's id column (migration 0005).
This module must not import Dagster.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from sqlalchemy import BigInteger, Integer, SmallInteger, String, Uuid
from sqlalchemy.types import TypeDecorator, TypeEngine

MediaId = int | str
IdType = Literal["integer", "text", "uuid"]


def id_type_of(sql_type: TypeEngine[Any]) -> IdType:
    """The id type of a reflected column type: integer, uuid or text."""
    if isinstance(sql_type, Integer | SmallInteger | BigInteger):
        return "integer"
    if isinstance(sql_type, Uuid) or type(sql_type).__name__.upper() == "UUID":
        return "uuid"
    return "text"


def column_type(id_type: IdType, dialect: str) -> TypeEngine[Any]:
    """The SQL type of the pipeline's own `media_id` columns for a gallery whose ids are of id_type."""
    if id_type == "integer":
        return Integer()
    if id_type == "uuid" and dialect == "postgresql":
        return Uuid(as_uuid=False)
    return String(255)


def normalize_uuid(token: str) -> str | None:
    """The canonical lower-case form of a UUID, or None when token is not one."""
    try:
        return str(uuid.UUID(token.strip()))
    except ValueError:
        return None


class MediaIdType(TypeDecorator[Any]):
    """The pipeline's `media_id` columns: INTEGER for integer galleries (the DDL of the models), the
    gallery's text or uuid type where migration 0005 (or the first init-db) made them so. Values are bound
    as given; a UUID read back is its canonical text, so a media id is always an int or a str."""

    impl = Integer
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return str(value) if isinstance(value, uuid.UUID) else value
