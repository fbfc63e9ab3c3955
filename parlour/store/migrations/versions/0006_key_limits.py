"""Per-key limits and the counters that enforce them across processes.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add api_keys.requests_per_minute and tokens_per_day, and the table of counters."""
    op.add_column("api_keys", sa.Column("requests_per_minute", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("tokens_per_day", sa.Integer(), nullable=True))
    op.create_table(
        "rate_limit_counters",
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("hits", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop what upgrade() added."""
    op.drop_table("rate_limit_counters")
    op.drop_column("api_keys", "tokens_per_day")
    op.drop_column("api_keys", "requests_per_minute")
