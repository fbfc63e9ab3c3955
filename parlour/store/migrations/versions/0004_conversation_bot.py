"""A conversation's optional bot.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add conversations.bot_id; deleting the bot leaves its conversations bot-less."""
    # The reference is written inside ADD COLUMN: SQLite cannot add a constraint to an
    # existing table, and copying `conversations` to rebuild it would cascade to messages.
    op.add_column(
        "conversations",
        sa.Column(
            "bot_id",
            sa.Uuid(),
            sa.ForeignKey("bots.uid", ondelete="SET NULL"),
            nullable=True,
        ),
        inline_references=True,
    )


def downgrade() -> None:
    """Drop conversations.bot_id."""
    op.drop_column("conversations", "bot_id")
