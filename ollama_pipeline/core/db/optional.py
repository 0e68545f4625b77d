"""`init-db --add-optional-columns`: the optional gallery columns the pipeline would use, added on request.

Only columns the pipeline writes and the gallery lacks are added (tag weights, timestamps, quality columns);
media_meta, lifecycle and audit columns are never added (the pipeline writes those tables in their own
layout). Each added column is recorded in the pipeline's table `ollama_added_columns`, so
`--drop-optional-columns` removes exactly those and nothing the gallery had before. `--sql` prints the
statements without running them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Engine, MetaData, String, Table, select, text

from ollama_pipeline.core.db.gallery import ADDABLE, SPECS, Gallery, forget

_meta = MetaData()
ADDED = Table("ollama_added_columns", _meta, Column("table_name", String(255), primary_key=True),
              Column("column_name", String(255), primary_key=True), Column("added_at", DateTime))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _full(gallery: Gallery, table: Table) -> str:
    return (f"{_quote(table.schema)}." if table.schema else "") + _quote(table.name)


def _added(engine: Engine) -> set[tuple[str, str]]:
    from sqlalchemy import inspect

    if ADDED.name not in inspect(engine).get_table_names():
        return set()
    with engine.connect() as conn:
        return {(r[0], r[1]) for r in conn.execute(select(ADDED.c.table_name, ADDED.c.column_name))}


def add_optional_columns_sql(engine: Engine, gallery: Gallery, *, drop: bool = False) -> list[str]:
    """The ALTER TABLE statements that add (or, with drop, remove again) the optional columns."""
    added = _added(engine) if drop else set()
    out = []
    for logical, columns in ADDABLE.items():
        t = gallery.t(logical)
        if t is None:
            continue
        spec = {c.name: c for c in SPECS[logical].columns}
        for col in columns:
            if not drop and not t.has(col):
                out.append(f"ALTER TABLE {_full(gallery, t.table)} ADD COLUMN {_quote(col)} {spec[col].sql_type};")
            if drop and t.has(col) and (t.table.name, t.c(col).name) in added:
                out.append(f"ALTER TABLE {_full(gallery, t.table)} DROP COLUMN {_quote(t.c(col).name)};")
    return out


def apply_statements(engine: Engine, statements: list[str]) -> None:
    """Run the statements in one transaction; drops only columns that this command added before."""
    _meta.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        added = {(r[0], r[1]) for r in conn.execute(select(ADDED.c.table_name, ADDED.c.column_name))}
        for sql in statements:
            parts = sql.split()
            table, column = parts[2].split(".")[-1].strip('"'), parts[5].strip('";')
            if parts[3] == "DROP":
                if (table, column) not in added:
                    continue
                conn.execute(text(sql))
                conn.execute(ADDED.delete().where(ADDED.c.table_name == table, ADDED.c.column_name == column))
            else:
                conn.execute(text(sql))
                conn.execute(ADDED.insert().values(table_name=table, column_name=column,
                                                   added_at=datetime.now(UTC).replace(tzinfo=None)))
    forget(engine)
