"""Schema discovery: the pipeline's copy of written values (human-edit detection, full values behind a
gallery's own forms), the tag links it made (galleries without an origin column) and the optional columns
`init-db --add-optional-columns` added (so `--drop-optional-columns` removes exactly those).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    insp = sa.inspect(op.get_bind())
    if not insp.has_table("ollama_values"):
        op.create_table(
            "ollama_values",
            sa.Column("media_id", sa.Integer(), primary_key=True),
            sa.Column("key", sa.String(255), primary_key=True),
            sa.Column("value", sa.Text()),
            sa.Column("written", sa.Text()),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
        )
    if not insp.has_table("ollama_tag_links"):
        op.create_table(
            "ollama_tag_links",
            sa.Column("media_id", sa.Integer(), primary_key=True),
            sa.Column("tag_id", sa.Integer(), primary_key=True),
            sa.Column("created_at", sa.DateTime(), nullable=False),
        )
    if not insp.has_table("ollama_added_columns"):
        op.create_table(
            "ollama_added_columns",
            sa.Column("table_name", sa.String(255), primary_key=True),
            sa.Column("column_name", sa.String(255), primary_key=True),
            sa.Column("added_at", sa.DateTime()),
        )


def downgrade() -> None:
    op.drop_table("ollama_added_columns")
    op.drop_table("ollama_tag_links")
    op.drop_table("ollama_values")
