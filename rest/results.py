"""The results page: an HTML shell, its script and style, the charting library, and the two JSON
answers the page draws (every test; one test's results), on the HTTP API's port.

The page is static; what it shows comes from `/api/tests` and `/api/tests/<id>`, which take the
API's tokens (the page sends the one its user typed, kept in the browser's session storage only)
and answer from the same core calls as gRPC's Summary, Timeseries and Segments, so the page shows
the numbers any client gets. Charts are Vega-Lite specs compiled to Vega by `make ui` and drawn by
Vega, both served from what `make ui` installs and builds (never a CDN: the page works without the
internet).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

from abstream.clients.client import span_named
from abstream.core.auth import Principal
from abstream.core.dataplane import Core
from abstream.core.errors import AbstreamError, InvalidArgument, NotFound
from abstream.core.types import (
    MAX_HTTP_POINTS,
    METRICS,
    Analysis,
    AnalysisOptions,
    Dimension,
    Health,
    Interval,
    SegmentsQuery,
    SummaryQuery,
    TestInfo,
    TimeseriesQuery,
)
from abstream.rest.pipes import Params, parse_datetime
from abstream.rest.formats import json_array
from aiohttp import web

UI = Path(__file__).resolve().parent / "ui"
#: What `make ui` installs and builds for the page's charts, by the name the page asks for: Vega's
#: browser build and the charts (Vega-Lite specs compiled to Vega), with their types.
VENDOR = {"vega.min.js": ("node_modules/vega/build/vega.min.js", "application/javascript"),
          "charts.json": ("build/charts.json", "application/json")}
STATIC = {"app.js": "application/javascript", "app.css": "text/css"}
#: Tests whose status the list computes (by latest activity); the rest show their counts only.
STATUS_LIMIT = 200
NS = 1_000_000_000
#: Scripts from this server only; Vega compiles its expressions with Function(), hence unsafe-eval.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")


def finite(x: float) -> float | None:
    """JSON has no NaN or infinity: a value that is not finite is null."""
    return float(x) if math.isfinite(x) else None


def iso(ns: int) -> str:
    """RFC 3339 to the microsecond, rounded down (ns / 1e9 as a float rounded the last nanosecond
    of a day up to the next day)."""
    seconds, rest = divmod(ns, NS)
    moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc) + dt.timedelta(microseconds=rest // 1000)
    return moment.isoformat().replace("+00:00", "Z")


def day_range(p: Params) -> tuple[int | None, int | None]:
    """`start` and `end` (a date, or a date and time), UTC; an end takes in the whole day, hour,
    minute or second it names, as the Client's and the CLI's do."""
    out: list[int | None] = []
    for name in ("start", "end"):
        text = p.get(name).strip()
        if not text:
            out.append(None)
            continue
        ns = parse_datetime(name, text) * NS
        if name == "end":
            span = span_named(text)  # None with a fraction, which parse_datetime drops: that second
            ns += (span // dt.timedelta(microseconds=1) * 1000 if span else NS) - 1
        out.append(ns)
    if out[0] is not None and out[1] is not None and out[1] < out[0]:
        raise InvalidArgument("end", "is before start")  # named as the page's (the core says end_time)
    return out[0], out[1]


def status_of(analysis: Analysis | None, confidence: float) -> dict[str, str]:
    """The badge: a sample ratio mismatch first (nothing else can be trusted), then a treatment
    whose conversion differs from the control's at the chosen confidence, else collecting."""
    if analysis is None or not analysis.comparisons:
        return {"kind": "collecting", "text": "collecting"}
    if analysis.srm_flagged:
        return {"kind": "srm", "text": "sample ratio mismatch"}
    alpha = 1 - confidence
    primary = [c for c in analysis.comparisons if c.metric == METRICS[0] and c.result.relative.status == "ok"]
    winners = [c for c in primary if c.adjusted_relative_p < alpha and c.result.relative.estimate > 0]
    losers = [c for c in primary if c.adjusted_relative_p < alpha and c.result.relative.estimate < 0]
    if winners:
        best = max(winners, key=lambda c: c.result.relative.estimate)
        return {"kind": "winner", "text": f"{best.variant} wins"}
    if losers:
        worst = min(losers, key=lambda c: c.result.relative.estimate)
        return {"kind": "loser", "text": f"{worst.variant} loses"}
    return {"kind": "collecting", "text": "collecting"}


def _estimate(e) -> dict[str, Any]:
    return {"estimate": finite(e.estimate), "ci_low": finite(e.ci_low), "ci_high": finite(e.ci_high),
            "p_value": finite(e.p_value), "status": e.status, "message": e.message}


def _health(h: Health | None) -> dict[str, Any] | None:
    if h is None:
        return None
    return {"status": h.status, "reasons": h.reasons, "users": h.users, "multi_variant_users": h.multi_variant_users,
            "multi_variant_users_excluded": h.multi_variant_users_excluded, "srm_p_value": finite(h.srm_p_value),
            "srm": h.srm, "events_before_start": h.events_before_start, "future_events": h.future_events}


def _test(t: TestInfo) -> dict[str, Any]:
    plan = t.experiment
    return {"test_id": t.test_id, "variants": t.variants, "events": t.events, "users": t.users,
            "first_event": iso(t.first_event_ns) if t.events else None,
            "last_event": iso(t.last_event_ns) if t.events else None,
            "experiment": None if plan is None else {
                "control_variant": plan.control_variant, "split": plan.split, "hypothesis": plan.hypothesis,
                "start": iso(plan.start_ns) if plan.start_ns is not None else None,
                "stop": iso(plan.stop_ns) if plan.stop_ns is not None else None}}


def _metric_rows(variants: list[str], m) -> list[dict[str, Any]]:
    columns = {"users": m.users, "conversions": m.conversions, "conversion_rate": m.conversion_rate,
               "total_revenue": m.total_revenue, "revenue_per_user": m.revenue_per_user, "events": m.events,
               "converted_users": m.converted_users, "user_conversion_rate": m.user_conversion_rate}
    lists = {k: v.tolist() for k, v in columns.items()}
    return [{"variant": v, **{k: (finite(x) if isinstance(x, float) else x) for k, x in zip(lists, values)}}
            for v, values in zip(variants, zip(*lists.values()))]


class ResultsPage:
    """The page's routes, added to the HTTP API's application."""

    def __init__(self, core: Core, route) -> None:
        self.core = core
        self._route = route
        # Each test's badge, by what it was worked out from: a test unchanged since the last
        # refresh (its events, their span, its plan) is not analysed again. Every viewer's page
        # asks every few seconds, and most tests of a long list are idle.
        self._badges: dict[str, tuple[tuple, dict[str, str]]] = {}

    def add_routes(self, app: web.Application) -> None:
        route = self._route
        app.router.add_get("/", route("page", None, self.page))
        app.router.add_get("/tests/{test_id}", route("page", None, self.page))
        app.router.add_get("/static/{name}", route("static", None, self.static))
        app.router.add_get("/static/vendor/{name}", route("static", None, self.vendor))
        app.router.add_get("/api/tests", route("api_tests", "query", self.tests))
        app.router.add_get("/api/tests/{test_id}", route("api_test", "query", self.test))
        app.router.add_get("/api/tests/{test_id}/lift", route("api_test_lift", "query", self.lift))

    # ---- files -------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=(UI / "index.html").read_bytes(), content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise NotFound(f"no file {name[:64]!r} here")
        return web.Response(body=(UI / name).read_bytes(), headers={
            "Content-Type": f"{STATIC[name]}; charset=utf-8", "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff"})

    async def vendor(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in VENDOR:
            raise NotFound(f"no file {name[:64]!r} here")
        relative, kind = VENDOR[name]
        path = UI / relative
        if not path.is_file():
            raise NotFound(f"{name} is not built: run `make ui` for the page's charts")
        return web.FileResponse(path, headers={"Content-Type": f"{kind}; charset=utf-8",
                                               "Cache-Control": "public, max-age=86400",
                                               "X-Content-Type-Options": "nosniff"})

    # ---- what the page draws -----------------------------------------------------------------

    async def tests(self, request: web.Request) -> web.Response:
        """Every test, newest activity first, with its badge."""
        started = time.perf_counter()
        principal: Principal = request["principal"]
        tests = sorted(await self.core.list_tests(principal), key=lambda t: (-t.last_event_ns, t.test_id))
        rows, badges = [], {}
        for k, t in enumerate(tests):
            row = _test(t)
            row["status"] = {"kind": "unknown", "text": "—"}
            if k < STATUS_LIMIT and t.events:
                of = (t.events, t.users, t.first_event_ns, t.last_event_ns, tuple(t.variants),
                      t.experiment.updated_ns if t.experiment is not None else None)
                known = self._badges.get(t.test_id)
                if known is not None and known[0] == of:
                    row["status"] = known[1]
                else:
                    try:
                        r = await self.core.summary(principal, SummaryQuery(t.test_id))
                        row["status"] = status_of(r.analysis, AnalysisOptions().confidence)
                    except AbstreamError:  # deleted meanwhile, or refused: the others are still shown
                        rows.append(row)
                        continue
                badges[t.test_id] = (of, row["status"])
            rows.append(row)
        self._badges.update(badges)  # (a token that sees fewer tests does not forget the others')
        if len(self._badges) > 4 * STATUS_LIMIT:
            self._badges = badges
        return web.json_response({"tests": rows, "as_of": iso(time.time_ns()),
                                  "elapsed_ms": (time.perf_counter() - started) * 1000})

    async def lift(self, request: web.Request) -> web.Response:
        """A test's cumulative lift at the end of each bucket, by confidence sequences (the page
        draws it after the rest: it is one more query)."""
        started = time.perf_counter()
        p = Params(request.query)
        start, end = day_range(p)
        options = p.analysis()
        interval = p.choice("interval", {i: Interval[i.upper()] for i in ("hour", "day", "week")}, "day")
        keep = {"control_variant": options.control_variant, "confidence": options.confidence,
                "correction": options.correction}  # what the lift takes of the page's options
        r = await self.core.timeseries(request["principal"], TimeseriesQuery(
            request.match_info["test_id"], interval, start, end, True, lift=AnalysisOptions(**keep),
            most_points=MAX_HTTP_POINTS))
        lifts = [{"bucket": iso(bucket), "comparisons": [
            {"variant": c.variant, "metric": c.metric, "relative": _estimate(c.result.relative)}
            for c in a.comparisons]} for bucket, a in r.lifts]
        return web.json_response({"lifts": lifts, "elapsed_ms": (time.perf_counter() - started) * 1000})

    async def test(self, request: web.Request) -> web.Response:
        """One test: its variants and comparisons, cumulative rates over time, one breakdown."""
        started = time.perf_counter()
        principal: Principal = request["principal"]
        test_id = request.match_info["test_id"]
        p = Params(request.query)
        start, end = day_range(p)
        options = p.analysis()
        interval = p.choice("interval", {i: Interval[i.upper()] for i in ("hour", "day", "week")}, "day")
        dimension = p.choice("dimension", {d.value: d for d in Dimension}, "device")
        info = next((t for t in await self.core.list_tests(principal) if t.test_id == test_id), None)
        if info is None:
            raise NotFound(f"no test {test_id[:64]!r} has events here")
        summary, series, segments = await asyncio.gather(
            self.core.summary(principal, SummaryQuery(test_id, start, end, options)),
            self.core.timeseries(principal, TimeseriesQuery(test_id, interval, start, end, cumulative=True,
                                                            most_points=MAX_HTTP_POINTS)),
            self.core.segments(principal, SegmentsQuery(test_id, dimension, start, end,
                                                       analysis=dataclasses.replace(options, revenue_cap=None,
                                                                                   exclude_multi_variant_users=False))))
        # The answer is built and written in a thread: an hourly series of many variants is up to
        # MAX_HTTP_POINTS rows, seconds of Python the event loop (gRPC's too) must not wait for.
        return web.Response(body=await self.core.in_query_thread(self._test_answer, info, options, start, end,
                                                                 interval, dimension, summary, series, segments,
                                                                 started),
                            content_type="application/json", charset="utf-8")

    @staticmethod
    def _test_answer(info, options, start, end, interval, dimension, summary, series, segments, started) -> bytes:
        a = summary.analysis
        comparisons = [{"variant": c.variant, "metric": c.metric, "control_mean": finite(c.result.control_mean),
                        "treatment_mean": finite(c.result.treatment_mean), "absolute": _estimate(c.result.absolute),
                        "relative": _estimate(c.result.relative), "chance_to_win": finite(c.result.chance_to_win),
                        "adjusted_p_value": finite(c.adjusted_relative_p if c.result.relative.status == "ok"
                                                   else c.adjusted_absolute_p),
                        "status": c.result.status, "message": c.result.message,
                        "guardrail": None if c.guardrail is None else {
                            "margin": c.guardrail.margin, "non_inferior": c.guardrail.non_inferior,
                            "p_value": finite(c.guardrail.p_value), "lower_bound": finite(c.guardrail.lower_bound),
                            "status": c.guardrail.status, "message": c.guardrail.message}}
                       for c in (a.comparisons if a else [])]
        answer = {
            "test": _test(info), "status": status_of(a, options.confidence),
            "range": {"start": iso(start) if start is not None else None, "end": iso(end) if end is not None else None},
            "options": {"control": a.control_variant if a else "", "confidence": options.confidence,
                        "sequential": options.sequential, "correction": options.correction,
                        "exclude_multi_variant_users": options.exclude_multi_variant_users,
                        "relative_interval": options.relative_interval,
                        "guardrails": ",".join(f"{m}:{v:g}" for m, v in options.guardrails.items()),
                        "metric_event_type": options.metric_event_type,
                        "session_metrics": options.session_metrics,
                        "revenue_cap_percentile": options.revenue_cap.percentile if options.revenue_cap else None,
                        "revenue_cap_value": options.revenue_cap.value if options.revenue_cap else None,
                        "revenue_cap_nonzero_only": bool(options.revenue_cap and options.revenue_cap.nonzero_only),
                        "interval": interval.name.lower(), "dimension": dimension.value},
            "variants": _metric_rows(summary.variants, summary.metrics),
            "srm": {"p_value": finite(a.srm_p_value) if a else None, "flagged": bool(a and a.srm_flagged)},
            "health": _health(summary.health),
            "revenue_cap": None if a is None or a.revenue_cap is None else {
                "threshold": finite(a.revenue_cap.threshold), "pooled_users": a.revenue_cap.pooled_users,
                "capped_users": a.revenue_cap.capped_users},
            "comparisons": comparisons,
            "segments": [{"segment": s, **row} for s, row in
                         zip(segments.segments, _metric_rows(segments.variants, segments.metrics))],
            "events_scanned": summary.stats.events_scanned,
            "as_of": iso(time.time_ns()), "elapsed_ms": (time.perf_counter() - started) * 1000}
        series_rows = [{"bucket": iso(int(b)), **row} for b, row in
                       zip(series.bucket_start_ns.tolist(), _metric_rows(series.variants, series.metrics))]
        return (json.dumps(answer)[:-1] + f', "timeseries": {json_array(series_rows)}}}').encode()
