"""An async projection: a board of tickets by state, kept from the triage machine's events.

pgstate worker ticket_board:board          (with this directory on PYTHONPATH)
pgstate rebuild ticket_board:board
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgstate.models import RecordedEvent
from pgstate.projection import Projection


class TicketBoard(Projection):
    name = "ticket_board"
    table = "ticket_board"

    async def setup(self, conn: psycopg.AsyncConnection[Any], table: str) -> None:
        await conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} "
                "(ticket text PRIMARY KEY, state text NOT NULL, version bigint NOT NULL)"
            ).format(sql.Identifier(table))
        )

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], event: RecordedEvent, table: str
    ) -> None:
        state = event.metadata.get("to_state")
        if state is None:
            return
        await conn.execute(
            sql.SQL(
                "INSERT INTO {t} (ticket, state, version) VALUES (%s, %s, %s) "
                "ON CONFLICT (ticket) DO UPDATE SET state = excluded.state, "
                "version = excluded.version"
            ).format(t=sql.Identifier(table)),
            (event.stream_id, state, event.version),
        )


board = TicketBoard()
