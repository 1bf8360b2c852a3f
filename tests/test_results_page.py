"""The results page in a real browser (Debian's Chromium driven by Playwright) against a real
server: the numbers it shows are the gRPC API's, its controls change them, it updates itself,
and it warns where it must. Screenshots go to build/screenshots/ for a person to look at."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import shutil
import urllib.request
from pathlib import Path

import pytest
from abstream.clients import Client

from tests.test_http import TOKENS, Http

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by make test")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is installed by make test (apt-get)")

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
QUERY = TOKENS["query"]
BASE_DAY = dt.datetime(2025, 4, 1, tzinfo=dt.timezone.utc)


def experiment(test_id: str, users: dict[str, int], rates: dict[str, float], seed: int, days: int = 14,
               first_user: int = 0) -> list[dict]:
    """Events as users send them: each user of each variant seen one to three times over `days`."""
    rng = random.Random(seed)
    out = []
    for variant, n in users.items():
        for u in range(first_user, first_user + n):
            for _ in range(rng.randint(1, 3)):
                moment = BASE_DAY + dt.timedelta(seconds=rng.randrange(days * 86400))
                converted = int(rng.random() < rates[variant])
                out.append({"timestamp": moment.strftime("%Y-%m-%d %H:%M:%S"), "user_id": f"{variant}_{u}",
                            "test_id": test_id, "variant": variant,
                            "event_type": rng.choice(["view", "click", "purchase"]), "conversion": converted,
                            "revenue": round(rng.uniform(5, 120), 2) if converted else 0.0,
                            "session_id": f"s{u}", "device": rng.choice(["desktop", "mobile", "tablet"]),
                            "country": rng.choice(["AU", "US", "DE", "FR"])})
    return out


def post(server: Http, events: list[dict]) -> None:
    body = "".join(json.dumps(e) + "\n" for e in events).encode()
    status, answer = server.json("POST", "/v0/events?name=ab_test_events&wait=true", body, token=TOKENS["ingest"])
    assert status == 200 and answer["quarantined_rows"] == 0, answer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Http(tmp_path_factory.mktemp("results"))
    post(running, experiment("checkout", {"control": 2000, "treatment": 2000}, {"control": 0.10, "treatment": 0.14}, 1))
    post(running, experiment("banner_srm", {"control": 1500, "treatment": 1100}, {"control": 0.1, "treatment": 0.1}, 2))
    post(running, experiment("pricing", {"a": 800, "b": 800, "c": 800}, {"a": 0.2, "b": 0.2, "c": 0.19}, 3))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    requests: list[str] = []
    problems: list[str] = []
    opened.on("request", lambda r: requests.append(r.url))
    opened.on("pageerror", lambda e: problems.append(str(e)))
    opened.requests, opened.problems = requests, problems
    yield opened
    context.close()
    assert not problems, problems
    assert requests and all(u.startswith(server.base) or u.startswith("data:") for u in requests), requests


def rendered(page, at_least: int = 1, timeout: float = 20_000) -> None:
    page.wait_for_function(f"Number(document.body.dataset.renders || 0) >= {at_least}", timeout=timeout)


def renders(page) -> int:
    return int(page.evaluate("document.body.dataset.renders || 0"))


def value(page, selector: str) -> float:
    return float(page.locator(selector).get_attribute("data-value"))


def grpc(server: Http) -> Client:
    return Client(server.grpc, token=QUERY)


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


# ---- every test ------------------------------------------------------------------------------

def test_the_list_shows_every_test_with_its_status_and_searches(page, server, browser):
    page.goto(f"{server.base}/?token={QUERY}")
    rendered(page)
    assert "token" not in page.url  # kept in the tab, not in a URL that gets shared
    with grpc(server) as client:
        tests = {t.test_id: t for t in client.list_tests().rows}
    rows = page.locator("#tests tbody tr")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.testId)")) == sorted(tests)
    for test_id, t in tests.items():
        row = f'#tests tr[data-test-id="{test_id}"]'
        assert value(page, f'{row} td[data-col="events"]') == t.events
        assert value(page, f'{row} td[data-col="users"]') == t.users
    assert page.locator('tr[data-test-id="checkout"] [data-status]').get_attribute("data-status") == "winner"
    assert page.locator('tr[data-test-id="banner_srm"] [data-status]').get_attribute("data-status") == "srm"
    assert page.locator('tr[data-test-id="pricing"] [data-status]').get_attribute("data-status") == "collecting"
    screenshot(page, "list-desktop")
    # The list has no charts: the charting library (~800 kB of script) is not loaded for it.
    assert not page.evaluate("[...document.scripts].some(s => s.src.includes('/static/vendor/'))")

    page.locator("#search").fill("pri")
    assert page.locator("#tests tbody tr:visible").evaluate_all("rs => rs.map(r => r.dataset.testId)") == ["pricing"]
    assert "q=pri" in page.url
    page.reload()
    rendered(page)
    assert page.locator("#search").input_value() == "pri"
    assert page.locator("#tests tbody tr:visible").count() == 1

    page.locator("#search").fill("")
    page.locator('a[href="/tests/checkout"]').focus()
    page.keyboard.press("Enter")  # every link and control works from the keyboard
    page.wait_for_url(re.compile(r"/tests/checkout$"))
    rendered(page)
    assert page.evaluate("[...document.scripts].some(s => s.src.includes('/static/vendor/vega'))")

    phone = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
    phone.goto(f"{server.base}/?token={QUERY}")
    rendered(phone)
    assert phone.locator("#tests tbody tr").count() == len(tests)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling of the page
    screenshot(phone, "list-phone")
    phone.context.close()


def test_an_empty_server_says_how_to_send_the_first_event(browser, tmp_path):
    empty = Http(tmp_path)
    try:
        page = browser.new_page()
        page.goto(f"{empty.base}/?token={QUERY}")
        rendered(page)
        text = page.locator("#empty").inner_text()
        assert "No events yet" in text and f"{empty.base}/v0/events?name=ab_test_events" in text
        page.close()
    finally:
        empty.stop()


# ---- one test --------------------------------------------------------------------------------

def assert_same_as_grpc(page, server: Http, test_id: str, start=None, end=None, **options) -> None:
    """The variants and comparisons tables hold exactly what gRPC Summary answers."""
    with grpc(server) as client:
        summary = client.summary(test_id, start, end, **options)
    shown = page.locator("#variants tbody tr").evaluate_all("rs => rs.map(r => r.dataset.variant)")
    assert shown == [r.variant for r in summary.rows]
    for r in summary.rows:
        row = f'#variants tr[data-variant="{r.variant}"]'
        for metric in ("users", "conversions", "conversion_rate", "total_revenue", "revenue_per_user"):
            assert value(page, f'{row} td[data-metric="{metric}"]') == getattr(r.metrics, metric), (r.variant, metric)
    comparisons = summary.analysis.comparisons
    assert page.locator("#comparisons tbody tr").count() == len(comparisons) > 0
    for c in comparisons:
        row = f'#comparisons tr[data-variant="{c.variant}"][data-metric="{c.metric}"]'
        assert value(page, f'{row} td[data-field="relative_lift"]') == c.relative.estimate
        if c.relative.status == "ok":
            interval = page.locator(f'{row} td[data-field="relative_lift"]')
            assert [float(interval.get_attribute(a)) for a in ("data-ci-low", "data-ci-high")] == [
                c.relative.ci_low, c.relative.ci_high]
        assert value(page, f'{row} td[data-field="absolute_lift"]') == c.absolute.estimate
        assert value(page, f'{row} td[data-field="p_value"]') == c.relative.adjusted_p_value
        assert value(page, f'{row} td[data-field="chance_to_win"]') == c.chance_to_win


def test_a_tests_page_shows_the_grpc_numbers_and_its_controls_change_them(page, server, browser):
    page.goto(f"{server.base}/tests/checkout?token={QUERY}")
    rendered(page)
    assert_same_as_grpc(page, server, "checkout")
    assert page.locator('#comparisons tr[data-metric="conversion"]').get_attribute("data-outcome") == "better"
    assert page.locator("#forest svg").count() == 1 and page.locator("#ts-revenue svg").count() == 1
    assert page.locator("#srm").count() == 0
    page.wait_for_selector('#lift-chart[data-drawn="true"] svg')
    with grpc(server) as client:
        lifts = client.timeseries("checkout", "day", cumulative=True, lift=True).lifts
    drawn = sum(1 for _, a in lifts for c in a.comparisons
                if c.metric in ("conversion", "revenue_per_user") and c.relative.status == "ok")
    assert int(page.locator("#lift-chart").get_attribute("data-points")) == drawn > 0
    screenshot(page, "test-desktop")

    before = renders(page)
    page.locator('input[name="start"]').fill("2025-04-03")
    rendered(page, before + 1)
    before = renders(page)
    page.locator('input[name="end"]').fill("2025-04-09")
    rendered(page, before + 1)
    assert "start=2025-04-03" in page.url and "end=2025-04-09" in page.url
    assert_same_as_grpc(page, server, "checkout", "2025-04-03", "2025-04-09")

    before = renders(page)
    page.locator('select[name="control"]').select_option("treatment")
    rendered(page, before + 1)
    assert set(page.locator("#comparisons tbody tr").evaluate_all("rs => rs.map(r => r.dataset.variant)")) == {"control"}
    assert_same_as_grpc(page, server, "checkout", "2025-04-03", "2025-04-09", control="treatment")

    before = renders(page)
    page.locator('select[name="confidence"]').select_option("0.99")
    rendered(page, before + 1)
    before = renders(page)
    page.locator('input[name="sequential"]').check()
    rendered(page, before + 1)
    assert_same_as_grpc(page, server, "checkout", "2025-04-03", "2025-04-09", control="treatment", confidence=0.99,
                        sequential=True)
    before = renders(page)
    page.locator('select[name="relative_interval"]').select_option("fieller")
    rendered(page, before + 1)
    assert "relative_interval=fieller" in page.url
    before = renders(page)
    page.locator('input[name="guardrails"]').fill("revenue_per_user:0.05")
    page.locator('input[name="guardrails"]').press("Enter")
    page.locator('input[name="guardrails"]').blur()
    rendered(page, before + 1)
    with grpc(server) as client:
        guarded = client.summary("checkout", "2025-04-03", "2025-04-09", control="treatment", confidence=0.99,
                                 sequential=True, relative_interval="fieller",
                                 guardrails={"revenue_per_user": 0.05}).analysis.comparisons
    for c in guarded:
        row = f'#comparisons tr[data-variant="{c.variant}"][data-metric="{c.metric}"] td[data-field="guardrail"]'
        if c.guardrail:
            assert value(page, row) == int(c.guardrail.non_inferior)
        else:
            assert page.locator(row).count() == 0
    before = renders(page)
    page.locator('input[name="metric_event_type"]').fill("purchase")
    page.locator('input[name="metric_event_type"]').press("Enter")
    page.locator('input[name="metric_event_type"]').blur()
    rendered(page, before + 1)
    assert "metric_event_type=purchase" in page.url
    assert_same_as_grpc(page, server, "checkout", "2025-04-03", "2025-04-09", control="treatment", confidence=0.99,
                        sequential=True, relative_interval="fieller", metric_event_type="purchase")
    before = renders(page)
    page.locator('input[name="metric_event_type"]').fill("")
    page.locator('input[name="metric_event_type"]').blur()
    rendered(page, before + 1)
    assert "metric_event_type" not in page.url
    assert_same_as_grpc(page, server, "checkout", "2025-04-03", "2025-04-09", control="treatment", confidence=0.99,
                        sequential=True, relative_interval="fieller")
    assert page.locator("#revenue-cap").count() == 0
    before = renders(page)
    page.locator('input[name="revenue_cap_percentile"]').fill("95")
    page.locator('input[name="revenue_cap_percentile"]').blur()
    rendered(page, before + 1)
    before = renders(page)
    page.locator('input[name="revenue_cap_nonzero_only"]').check()
    rendered(page, before + 1)
    assert "revenue_cap_percentile=95" in page.url and "revenue_cap_nonzero_only=true" in page.url
    cap = {"percentile": 95, "nonzero_only": True}
    assert_same_as_grpc(page, server, "checkout", "2025-04-03", "2025-04-09", control="treatment", confidence=0.99,
                        sequential=True, relative_interval="fieller", revenue_cap=cap)
    with grpc(server) as client:
        applied = client.summary("checkout", "2025-04-03", "2025-04-09", control="treatment",
                                 revenue_cap=cap).analysis.revenue_cap
    assert applied.threshold > 0
    assert float(page.locator("#revenue-cap").get_attribute("data-threshold")) == applied.threshold
    assert f"{applied.capped_users:,} users were above it" in page.locator("#revenue-cap").inner_text()
    before = renders(page)
    page.locator('input[name="revenue_cap_percentile"]').fill("")
    page.locator('input[name="revenue_cap_nonzero_only"]').uncheck()
    page.locator('input[name="revenue_cap_percentile"]').blur()
    rendered(page, before + 1)
    page.wait_for_function("!location.search.includes('revenue_cap')")
    assert page.locator('#comparisons tr[data-metric="events_per_session"]').count() == 0
    before = renders(page)
    page.locator('input[name="session_metrics"]').check()
    rendered(page, before + 1)
    assert "session_metrics=true" in page.url
    assert page.locator('#comparisons tr[data-metric="events_per_session"]').count() == 1
    assert_same_as_grpc(page, server, "checkout", "2025-04-03", "2025-04-09", control="treatment", confidence=0.99,
                        sequential=True, relative_interval="fieller", session_metrics=True)
    before = renders(page)
    page.locator('input[name="session_metrics"]').uncheck()
    rendered(page, before + 1)

    with grpc(server) as client:
        hours = client.timeseries("checkout", "hour", "2025-04-03", "2025-04-09", cumulative=True).rows
        days = client.timeseries("checkout", "day", "2025-04-03", "2025-04-09", cumulative=True).rows
    assert page.locator("#ts-conversion").get_attribute("data-rows") == str(len(days))
    before = renders(page)
    page.locator('select[name="interval"]').select_option("hour")
    rendered(page, before + 1)
    assert page.locator("#ts-conversion").get_attribute("data-rows") == str(len(hours)) != str(len(days))

    before = renders(page)
    page.locator("#dimension").select_option("country")
    rendered(page, before + 1)
    with grpc(server) as client:
        segments = client.segments("checkout", "country", "2025-04-03", "2025-04-09").rows
    for s in segments:
        row = f'#segments tr[data-segment="{s.segment}"][data-variant="{s.variant}"]'
        assert value(page, f'{row} td[data-metric="users"]') == s.metrics.users
        assert value(page, f'{row} td[data-metric="conversion_rate"]') == s.metrics.conversion_rate

    shared = page.url  # the view, shared: the same choices, the same numbers
    other = browser.new_context().new_page()
    other.goto(shared + f"&token={QUERY}")
    rendered(other)
    assert other.locator('select[name="control"]').input_value() == "treatment"
    assert other.locator('select[name="interval"]').input_value() == "hour"
    assert other.locator('input[name="sequential"]').is_checked()
    assert other.locator("#dimension").input_value() == "country"
    assert other.locator('select[name="relative_interval"]').input_value() == "fieller"
    assert_same_as_grpc(other, server, "checkout", "2025-04-03", "2025-04-09", control="treatment", confidence=0.99,
                        sequential=True, relative_interval="fieller")
    other.context.close()

    phone = browser.new_context(viewport={"width": 390, "height": 844}).new_page()
    phone.goto(f"{server.base}/tests/checkout?token={QUERY}")
    rendered(phone)
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(phone, "test-phone")
    phone.context.close()


def test_new_events_show_up_without_a_reload(page, server):
    page.goto(f"{server.base}/tests/pricing?token={QUERY}")
    rendered(page)
    page.evaluate("window.stillThisPage = true")
    users = value(page, '#variants tr[data-variant="a"] td[data-metric="users"]')
    post(server, experiment("pricing", {"a": 50}, {"a": 0.5}, 9, first_user=10_000))
    page.wait_for_function(
        f"""Number(document.querySelector('#variants tr[data-variant="a"] td[data-metric="users"]')
            .dataset.value) === {users + 50}""", timeout=20_000)
    assert page.evaluate("window.stillThisPage") is True
    assert_same_as_grpc(page, server, "pricing")
    page.wait_for_function("/updated \\d+ s ago/.test(document.getElementById('updated').textContent)")


def test_a_slow_answer_is_not_polled_again_until_it_comes(page, server):
    """The page polls every 3 s; while its answer is held back (a server slow under load), it
    asks nothing more, and draws the answer once it comes."""
    held = []
    page.route(re.compile(r"/api/tests/pricing\?"), lambda route: held.append(route))
    page.goto(f"{server.base}/tests/pricing?token={QUERY}")
    deadline = 50
    while not held and deadline:
        page.wait_for_timeout(100)
        deadline -= 1
    page.wait_for_timeout(7_500)  # two polls and more
    assert len(held) == 1, [r.request.url for r in held]
    held[0].continue_()
    page.unroute(re.compile(r"/api/tests/pricing\?"))
    rendered(page)
    assert_same_as_grpc(page, server, "pricing")


def test_the_sample_ratio_banner_shows_for_a_mismatch_only(page, server):
    with Client(server.grpc, token=TOKENS["admin"]) as admin:
        admin.create_experiment("banner_srm", control="control", split={"control": 50, "treatment": 50},
                                start="2025-04-01", hypothesis="the new banner brings more sign-ups")
    page.goto(f"{server.base}/tests/banner_srm?token={QUERY}")
    rendered(page)
    assert page.locator(".hypothesis").inner_text() == "the new banner brings more sign-ups"
    assert "Planned split control 50 / treatment 50" in page.locator("#facts").inner_text()
    assert "the planned split" in page.locator("#srm").inner_text()
    banner = page.locator("#srm")
    assert banner.is_visible() and "Sample ratio mismatch" in banner.inner_text()
    with grpc(server) as client:
        assert client.summary("banner_srm").analysis.sample_ratio_mismatch
        assert not client.summary("pricing").analysis.sample_ratio_mismatch
    assert page.locator('h1 [data-status]').get_attribute("data-status") == "srm"
    # the health block comes first, with the status and reasons the Summary has
    with grpc(server) as client:
        health = client.summary("banner_srm").health
    first = page.locator("#results > *").first
    assert first.get_attribute("id") == "health" and first.get_attribute("data-status") == health.status == "unhealthy"
    assert page.locator("#health li").all_inner_texts() == health.reasons
    page.goto(f"{server.base}/tests/pricing")
    rendered(page)
    assert page.locator("#srm").count() == 0
    with grpc(server) as client:
        assert client.summary("pricing").health.status == "healthy"
    assert page.locator("#health").get_attribute("data-status") == "healthy"
    assert "each in one variant" in page.locator("#health").inner_text()


def test_a_wrong_token_is_told_and_the_right_one_asked_for(page, server):
    page.goto(f"{server.base}/tests/checkout?token=not-a-token")
    page.wait_for_selector("#error")
    assert "refused the token" in page.locator("#error").inner_text()
    assert "unknown token" in page.locator("#error").inner_text()
    assert page.locator("#variants").count() == 0
    page.locator("#token").fill(TOKENS["ingest"])  # a real token without the query scope
    page.locator("#login button").click()
    page.wait_for_function("document.getElementById('error').textContent.includes('query')")
    page.locator("#token").fill(QUERY)
    page.locator("#login button").click()
    rendered(page)
    assert_same_as_grpc(page, server, "checkout")


def test_everything_the_page_loads_comes_from_the_server(server):
    """No CDN: the page, its script, style and the charting library are served here, with a
    policy that allows nothing else; an unknown test is a clear 404."""
    with urllib.request.urlopen(f"{server.base}/tests/checkout") as response:
        policy = response.headers["Content-Security-Policy"]
        html = response.read().decode()
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    scripts = re.findall(r'src="([^"]+)"', html)
    assert scripts and all(s.startswith("/static/") for s in scripts)
    for path in scripts + [f"/static/vendor/{name}" for name in ("vega.min.js", "charts.json")]:
        with urllib.request.urlopen(server.base + path) as response:
            assert response.status == 200 and len(response.read()) > 1000
    status, answer = server.json("GET", "/api/tests/no_such_test", token=QUERY)
    assert status == 404 and "no_such_test" in answer["error"]
    status, answer = server.json("GET", "/api/tests/checkout?start=yesterday", token=QUERY)
    assert status == 400 and "start" in answer["error"]
    status, answer = server.json("GET", "/api/tests/checkout?start=2025-04-29&end=2025-04-28", token=QUERY)
    assert (status, answer["error"]) == (400, "end: is before start")


def test_charts_say_buckets_in_utc_wherever_the_browser_is(browser, server):
    """Every other time on the page is UTC: a chart drawn in the browser's own time zone put a
    day's bucket on the day before west of Greenwich (Honolulu: 2025-04-01 UTC on Mar 31)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, timezone_id="Pacific/Honolulu")
    try:
        page = context.new_page()
        page.goto(f"{server.base}/tests/checkout?token={QUERY}")
        rendered(page)
        page.wait_for_selector("#ts-conversion svg")
        labels = page.locator("#ts-conversion svg [aria-label]").evaluate_all(
            "items => items.map(i => i.getAttribute('aria-label'))")
        assert any(label.startswith("X-axis for a utc scale with values from Tuesday, 01 April 2025, 12:00:00 AM UTC")
                   for label in labels), labels
        lines = [label for label in labels if label.startswith("bucket: ")]
        assert lines and all(label.startswith("bucket: Apr 01, 2025;") and "from (UTC): 2025-04-01 00:00" in label
                             for label in lines), lines
        assert not any("Mar 31" in label or "March 2025" in label for label in labels), labels
    finally:
        context.close()


def test_a_busy_server_is_asked_again_when_it_says_and_less_often_while_it_stays_busy(page, server):
    """A server at its --max-queries answers 429 with Retry-After: the page waits that long, and
    longer (up to a minute) while refusals go on, where every open page asked every 3 s."""
    import dataclasses

    core = server.thread.server.core
    limits = core.limits
    core.limits = dataclasses.replace(limits, max_queries=0)  # every query refused, as by a busy server
    try:
        page.goto(f"{server.base}/?token={QUERY}")
        page.wait_for_selector("#error")
        assert re.search(r"--max-queries\); retry; trying again in 6 s", page.locator("#error").inner_text())
        asked = len([u for u in page.requests if "/api/tests" in u])
        page.wait_for_timeout(4_500)  # a poll and a half
        assert len([u for u in page.requests if "/api/tests" in u]) == asked
    finally:
        core.limits = limits
    page.wait_for_selector("#tests tbody tr", timeout=15_000)  # asked again once the wait is over
    page.wait_for_selector("#error", state="detached")


def test_a_confidence_the_select_lacks_and_a_segment_named_like_an_objects_prototype_are_shown(page, server):
    """`?confidence=0.8` was analysed at 80% but shown as 90% (the select's first option), and a
    segment named `__proto__` was counted into a plain object's prototype and left off the chart."""
    events = experiment("odd_names", {"control": 40, "treatment": 40}, {"control": 0.1, "treatment": 0.2}, 5)
    for i, event in enumerate(events):
        event["country"] = "__proto__" if i % 2 else "AU"
    post(server, events)
    page.goto(f"{server.base}/tests/odd_names?token={QUERY}&confidence=0.8&dimension=country")
    rendered(page)
    chosen = page.locator('select[name="confidence"] option:checked')
    assert (chosen.get_attribute("value"), chosen.inner_text()) == ("0.8", "80%")
    page.wait_for_selector("#segments-chart svg")
    labels = page.locator("#segments-chart svg [aria-label]").evaluate_all(
        "items => items.map(i => i.getAttribute('aria-label'))")
    segments = {part.strip() for label in labels for part in label.split(";") if part.strip().startswith("segment: ")}
    assert segments == {"segment: AU", "segment: __proto__"}, labels
