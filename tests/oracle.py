"""The tutorial's SQL, run by DuckDB over the same events: an independent answer to compare with."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from tests.events import to_table

_METRICS = """
    count(DISTINCT user_id) AS users,
    count(*) FILTER (WHERE conversion = 1) AS conversions,
    sum(revenue) AS total_revenue,
    count(*) AS events,
    count(DISTINCT user_id) FILTER (WHERE conversion = 1) AS converted_users
"""
_TRUNC = {"MINUTE": "minute", "HOUR": "hour", "DAY": "day", "WEEK": "week"}


class Oracle:
    def __init__(self, events: list[dict]) -> None:
        table = to_table(events)
        ts = pa.compute.cast(table.column("timestamp"), pa.timestamp("ns"))
        self.events = table.set_column(0, "timestamp", ts)
        self.db = duckdb.connect()
        self.db.register("ab_test_events", self.events)

    def _where(self, test_id, start_ns, end_ns, filters=None) -> tuple[str, list]:
        clauses, params = ["test_id = ?"], [test_id]
        if start_ns is not None:
            clauses.append("epoch_ns(timestamp) >= ?")
            params.append(start_ns)
        if end_ns is not None:
            clauses.append("epoch_ns(timestamp) <= ?")
            params.append(end_ns)
        for name, value in (filters or {}).items():
            clauses.append(f"{name} = ?")
            params.append(value)
        return " AND ".join(clauses), params

    def _rows(self, sql: str, params: list) -> list[dict]:
        result = self.db.execute(sql, params)
        names = [d[0] for d in result.description]
        return [dict(zip(names, row)) for row in result.fetchall()]

    def summary(self, test_id, start_ns=None, end_ns=None) -> list[dict]:
        where, params = self._where(test_id, start_ns, end_ns)
        return self._rows(f"SELECT variant, {_METRICS} FROM ab_test_events WHERE {where} "
                          "GROUP BY variant ORDER BY variant", params)

    def segments(self, test_id, dimension, start_ns=None, end_ns=None, filters=None) -> list[dict]:
        where, params = self._where(test_id, start_ns, end_ns, filters)
        return self._rows(f"SELECT variant, {dimension} AS segment, {_METRICS} FROM ab_test_events "
                          f"WHERE {where} GROUP BY variant, segment ORDER BY variant, segment", params)

    def timeseries(self, test_id, interval, start_ns=None, end_ns=None, filters=None,
                   cumulative=False) -> list[dict]:
        where, params = self._where(test_id, start_ns, end_ns, filters)
        trunc = f"date_trunc('{_TRUNC[interval]}', timestamp)"
        if not cumulative:
            sql = (f"SELECT epoch_ns({trunc}) AS bucket, variant, {_METRICS} FROM ab_test_events "
                   f"WHERE {where} GROUP BY bucket, variant ORDER BY bucket, variant")
            return self._rows(sql, params)
        sql = (f"WITH ev AS (SELECT *, {trunc} AS b FROM ab_test_events WHERE {where}), "
               f"buckets AS (SELECT DISTINCT b FROM ev) "
               f"SELECT epoch_ns(buckets.b) AS bucket, variant, {_METRICS} "
               f"FROM buckets JOIN ev ON ev.b <= buckets.b "
               f"GROUP BY bucket, variant ORDER BY bucket, variant")
        return self._rows(sql, params)
