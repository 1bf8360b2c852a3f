// The results page: every test at "/", one test at "/tests/<id>". Everything shown comes from
// /api/tests and /api/tests/<id>; charts are Vega-Lite specs (charts.mjs) drawn by Vega. Every
// choice is in the URL, so a view can be shared; the token is kept in this tab's session storage.
"use strict";

const TOKEN_KEY = "abstream-token";
const POLL_MS = 3000;
// A server that stops answering (a half-open connection) must not end the polling; longer than
// the server's own limit on a query (--max-query-seconds, 60).
const REQUEST_TIMEOUT_MS = 90000;
const MOST_BACKOFF_MS = 60000;
const METRIC_LABELS = {
  conversion: "users converting",
  revenue_per_user: "revenue per user",
  conversions_per_user: "conversions per user",
  revenue_per_conversion: "revenue per conversion",
  conversions_per_session: "conversions per session",
  events_per_session: "events per session",
};

let lastFetched = 0;
let lastShown = "";
let renders = 0;
let pollTimer = null;
let latest = 0; // the newest refresh begun: what an older one fetched is not drawn
let inFlight = 0; // refreshes not done yet: the poll waits for them
let failures = 0; // refreshes that failed in a row
let pausedUntil = 0; // no poll before this (Date.now()): the server asked to wait (Retry-After), or keeps failing

// ---- the token -----------------------------------------------------------------------------

(function tokenFromUrl() {
  const url = new URL(location.href);
  if (url.searchParams.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, url.searchParams.get("token"));
    url.searchParams.delete("token");
    history.replaceState(null, "", url);
  }
})();

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function unanswered(message) {
  return Object.assign(new Error(message), { status: 0 });
}

async function api(path) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  let response, body;
  try {
    try {
      response = await fetch(path, { headers, cache: "no-store", signal: controller.signal });
    } catch (e) {
      throw unanswered(controller.signal.aborted ? `the server did not answer in ${REQUEST_TIMEOUT_MS / 1000} s`
                                                 : "the server cannot be reached");
    }
    try {
      body = await response.json();
    } catch (e) {
      if (controller.signal.aborted) throw unanswered(`the server did not answer in ${REQUEST_TIMEOUT_MS / 1000} s`);
      body = { error: `${response.status} ${response.statusText}` };
    }
  } finally {
    clearTimeout(timer);
  }
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.status = response.status;
    error.retryAfter = Number(response.headers.get("Retry-After")) || 0; // seconds
    throw error;
  }
  return body;
}

// ---- numbers for people --------------------------------------------------------------------

const formats = {};
function nf(key, options) {
  return (formats[key] ||= new Intl.NumberFormat("en", options));
}
function count(n) {
  if (n == null) return "–";
  return Math.abs(n) >= 10000
    ? nf("compact", { notation: "compact", maximumFractionDigits: 1 }).format(n)
    : nf("int", { maximumFractionDigits: 0 }).format(n);
}
function pct(x) {
  return x == null ? "–" : nf("pct", { style: "percent", minimumFractionDigits: 2, maximumFractionDigits: 2 }).format(x);
}
function money(x) {
  return x == null ? "–" : nf("money", { minimumFractionDigits: 2, maximumFractionDigits: 2 }).format(x);
}
function decimal(x) {
  return x == null ? "–" : nf("dec", { minimumFractionDigits: 3, maximumFractionDigits: 3 }).format(x);
}
function signed(text, x) {
  return (x > 0 ? "+" : x < 0 ? "−" : "") + text.replace(/^-/, "");
}
function pValue(p) {
  if (p == null) return "–";
  return p < 0.0001 ? "< 0.0001" : nf("p", { maximumFractionDigits: 4, minimumFractionDigits: 4 }).format(p);
}
// A metric's value, and a difference of it, in its own unit.
function metricValue(metric, x) {
  return metric === "conversion" ? pct(x) : metric.startsWith("revenue_per") ? money(x) : decimal(x);
}
function difference(metric, e) {
  const half = e.ci_high != null && e.ci_low != null ? (e.ci_high - e.ci_low) / 2 : null;
  if (metric === "conversion") {
    const pp = (x) => nf("pp", { minimumFractionDigits: 2, maximumFractionDigits: 2 }).format(Math.abs(x * 100)) + " pp";
    return `${signed(pp(e.estimate), e.estimate)} ±${half == null ? "–" : pp(half)}`;
  }
  const unit = metric.startsWith("revenue_per") ? money : decimal;
  return `${signed(unit(Math.abs(e.estimate)), e.estimate)} ±${half == null ? "–" : unit(half)}`;
}
function ago(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.round(s / 60)} min` : `${Math.round(s / 3600)} h`;
}
function when(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+Z$|Z$/, "") : "–";
}

// ---- building the page ---------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c != null) e.append(c instanceof Node ? c : String(c));
  return e;
}

function present(...nodes) {
  return nodes.flat().filter((n) => n != null);
}

function cell(value, text, attrs) {
  return h("td", { "data-value": value == null ? "" : value, ...attrs }, text);
}

function badge(status) {
  return h("span", { class: `badge badge-${status.kind}`, "data-status": status.kind }, status.text);
}

function showError(message) {
  let box = document.getElementById("error");
  if (!message) {
    if (box) box.remove();
    return;
  }
  if (!box) {
    box = h("div", { id: "error", class: "error", role: "alert" });
    document.getElementById("main").prepend(box);
  }
  box.textContent = message;
}

function askForToken(message) {
  const form = document.getElementById("login");
  const main = document.getElementById("main");
  main.replaceChildren(h("div", { id: "error", class: "error", role: "alert" }, message));
  form.hidden = false;
  main.append(form);
  const input = document.getElementById("token");
  input.focus();
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    form.hidden = true;
    document.body.append(form);
    start();
  };
}

function rendered() {
  renders += 1;
  document.body.dataset.renders = String(renders);
  if (renders === 1) window.abstreamFirstRender = performance.now();
  tick();
}

function setQuery(params) {
  const url = new URL(location.href);
  for (const [k, v] of Object.entries(params)) {
    if (v === "" || v == null || v === false) url.searchParams.delete(k);
    else url.searchParams.set(k, v === true ? "true" : v);
  }
  history.replaceState(null, "", url);
}

// The charting library and the page's charts (Vega-Lite specs compiled to Vega by `make ui`) load
// on a test's page only (the list has no charts), while its first data request is answered.
let charting = null;
function chartingLoaded() {
  charting ||= Promise.all([
    new Promise((resolve) => {
      const script = h("script", { src: "/static/vendor/vega.min.js" });
      script.onload = resolve;
      script.onerror = resolve;
      document.head.append(script);
    }),
    fetch("/static/vendor/charts.json").then((r) => (r.ok ? r.json() : null)).catch(() => null),
  ]).then(([, specs]) => specs);
  return charting;
}

const views = new Map(); // by chart id: each redraw finalizes the view before (its listeners go with it)

async function chart(id, name, values) {
  const target = document.getElementById(id);
  if (!target) return;
  const specs = await chartingLoaded();
  if (!window.vega || !specs) {
    target.replaceChildren(h("p", { class: "muted" }, "Charts need the charting library: run `make ui` on the server."));
    return;
  }
  if (views.has(id)) views.get(id).finalize();
  const view = new window.vega.View(window.vega.parse(specs[name]),
    { container: target, renderer: "svg", logLevel: window.vega.Error });
  views.set(id, view);
  await view.data("values", values).runAsync();
}

// ---- every test ----------------------------------------------------------------------------

async function showList(mine) {
  const data = await api("/api/tests");
  if (mine !== latest) return;
  const key = JSON.stringify(data.tests);
  lastFetched = Date.now();
  if (key === lastShown) return;
  lastShown = key;
  const main = document.getElementById("main");
  const q = new URL(location.href).searchParams.get("q") || "";
  if (!data.tests.length) {
    main.replaceChildren(emptyState());
    rendered();
    return;
  }
  const rows = data.tests.map((t) =>
    h("tr", { "data-test-id": t.test_id },
      h("td", {}, h("a", { href: `/tests/${encodeURIComponent(t.test_id)}` }, t.test_id)),
      h("td", {}, badge(t.status)),
      h("td", { class: "variants" }, t.variants.join(", ")),
      cell(t.events, count(t.events), { "data-col": "events", class: "num" }),
      cell(t.users, count(t.users), { "data-col": "users", class: "num" }),
      h("td", { class: "time" }, when(t.first_event)),
      h("td", { class: "time" }, when(t.last_event))));
  const search = h("input", { id: "search", type: "search", placeholder: "Search tests", value: q,
                              "aria-label": "Search tests" });
  const filter = () => {
    const needle = search.value.trim().toLowerCase();
    for (const row of rows) row.hidden = needle !== "" && !row.dataset.testId.toLowerCase().includes(needle);
    setQuery({ q: search.value.trim() });
  };
  search.addEventListener("input", filter);
  const hadFocus = document.activeElement && document.activeElement.id === "search";
  main.replaceChildren(
    h("h1", {}, "Tests"),
    search,
    h("div", { class: "scroll" },
      h("table", { id: "tests" },
        h("thead", {}, h("tr", {}, ["Test", "Status", "Variants", "Events", "Users", "First event", "Last event"]
          .map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows))));
  filter();
  if (hadFocus) search.focus();
  rendered();
}

function emptyState() {
  const command = `curl -X POST "${location.origin}/v0/events?name=ab_test_events" \\\n` +
    `  -H "Authorization: Bearer $TOKEN" \\\n` +
    `  -d '{"timestamp": "2025-04-28 18:42:22", "user_id": "user_455", "test_id": "test_5", ` +
    `"variant": "variant_a", "event_type": "click", "conversion": 1, "revenue": 84.55}'`;
  return h("section", { id: "empty", class: "empty" },
    h("h1", {}, "No events yet"),
    h("p", {}, "Send the first one, and its test appears here within a few seconds:"),
    h("pre", {}, h("code", {}, command)),
    h("p", { class: "muted" }, "Or stream them over gRPC (IngestEvents), or import a file: abstream ingest events.ndjson."));
}

// ---- one test ------------------------------------------------------------------------------

function testQuery() {
  const p = new URL(location.href).searchParams;
  const out = new URLSearchParams();
  for (const k of ["start", "end", "control", "confidence", "sequential", "correction", "interval", "dimension",
                   "exclude_multi_variant_users", "relative_interval", "guardrails", "metric_event_type",
                   "revenue_cap_percentile", "revenue_cap_nonzero_only", "session_metrics"]) {
    if (p.get(k)) out.set(k, p.get(k));
  }
  return out.toString();
}

function outcome(c, confidence) {
  const e = c.relative.status === "ok" ? c.relative : c.absolute;
  if (e.status !== "ok") return "unavailable";
  if (c.adjusted_p_value != null && c.adjusted_p_value < 1 - confidence) return e.estimate > 0 ? "better" : "worse";
  return "flat";
}

function controls(data) {
  const o = data.options;
  const p = new URL(location.href).searchParams;
  // A value the options lack (?confidence=0.8 in the address) is shown as itself, not as the first option.
  const select = (name, label, options, value, text = (v) => v) =>
    h("label", {}, label, h("select", { name },
      (options.some(([v]) => v === value) ? options : [...options, [value, text(value)]])
        .map(([v, t]) => h("option", { value: v, selected: v === value }, t))));
  const form = h("form", { id: "controls", class: "controls", onsubmit: (e) => e.preventDefault() },
    h("label", {}, "From", h("input", { type: "date", name: "start", value: p.get("start") || "" })),
    h("label", {}, "To", h("input", { type: "date", name: "end", value: p.get("end") || "" })),
    select("control", "Control", data.test.variants.map((v) => [v, v]), o.control),
    select("confidence", "Confidence", [["0.9", "90%"], ["0.95", "95%"], ["0.99", "99%"]], String(o.confidence),
      (v) => `${+(v * 100).toFixed(4)}%`),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "sequential", checked: o.sequential }),
      "Sequential (peeking-safe)"),
    select("correction", "Correction", [["none", "none"], ["holm", "Holm"], ["benjamini_hochberg", "Benjamini–Hochberg"]],
      o.correction),
    select("relative_interval", "Relative interval", [["delta", "delta method"], ["fieller", "Fieller"]],
      o.relative_interval),
    h("label", {}, "Conversions from", h("input", { type: "text", name: "metric_event_type",
                                                    value: o.metric_event_type || "", placeholder: "every event type",
                                                    size: 14, title: "count conversions and revenue from this event type only; every user stays" })),
    h("label", {}, "Guardrails", h("input", { type: "text", name: "guardrails", value: o.guardrails || "",
                                              placeholder: "revenue_per_user:0.02", size: 22,
                                              title: "metric:margin,… — each treatment tested for being at most that much worse" })),
    h("label", {}, "Cap revenue at percentile", h("input", { type: "number", name: "revenue_cap_percentile", min: 50,
                                                             max: 99.99, step: "any", size: 6, placeholder: "none",
                                                             value: o.revenue_cap_percentile || "",
                                                             title: "revenue per user above this percentile of every arm's users counts as it" })),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "revenue_cap_nonzero_only",
                                                checked: o.revenue_cap_nonzero_only }),
      "of paying users"),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "session_metrics", checked: o.session_metrics,
                                                title: "compare conversions and events per session (each user's distinct session ids)" }),
      "Per session"),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "exclude_multi_variant_users",
                                                checked: o.exclude_multi_variant_users }),
      "Leave out users seen in several variants"),
    select("interval", "Over time by", [["hour", "hour"], ["day", "day"], ["week", "week"]], o.interval));
  form.addEventListener("change", () => {
    const values = {};
    for (const el of form.elements) {
      if (!el.name) continue;
      values[el.name] = el.type === "checkbox" ? el.checked : el.value;
    }
    setQuery(values);
    refresh(true);
  });
  return form;
}

function capNote(data) {
  const cap = data.revenue_cap;
  if (!cap) return null;
  const o = data.options;
  const where = o.revenue_cap_value ? "a fixed value"
    : `the ${o.revenue_cap_percentile}th percentile of ${count(cap.pooled_users)} ${o.revenue_cap_nonzero_only ? "paying " : ""}users`;
  return h("p", { id: "revenue-cap", class: "muted", "data-threshold": cap.threshold ?? "" },
    cap.threshold == null ? "Revenue per user is not capped: no users to take the percentile over."
      : `Revenue per user is compared capped at ${cap.threshold.toLocaleString("en-US", { maximumFractionDigits: 2 })} ` +
        `(${where}); ${count(cap.capped_users)} users were above it.`);
}

function healthPanel(data) {
  const health = data.health;
  if (!health) return null;
  const title = { healthy: "Healthy", warning: "Check before trusting", unhealthy: "Unhealthy" }[health.status];
  return h("section", { id: "health", class: `health health-${health.status}`, "data-status": health.status,
                        "aria-label": "Experiment health" },
    h("strong", {}, `${title}. `),
    health.reasons.length
      ? h("ul", {}, health.reasons.map((r) => h("li", {}, r)))
      : `${count(health.users)} users, each in one variant; the split matches the plan; no events before the ` +
        "start or from the future.");
}

function srmBanner(data) {
  if (!data.srm.flagged) return null;
  const plan = data.test.experiment && Object.keys(data.test.experiment.split || {}).length
    ? "the planned split" : "an equal split";
  return h("div", { id: "srm", class: "srm", role: "alert" },
    h("strong", {}, "Sample ratio mismatch. "),
    `The variants' user counts are far from ${plan} (p = ${pValue(data.srm.p_value)}): assignment or ` +
    "logging is dropping or duplicating users in some variants, so the comparisons below are not to be " +
    "trusted until that is found and fixed.");
}

function variantsTable(data) {
  const control = data.options.control;
  return h("table", { id: "variants" },
    h("thead", {}, h("tr", {}, ["Variant", "Users", "Conversions", "Conversion rate", "Revenue", "Revenue per user"]
      .map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, data.variants.map((v) =>
      h("tr", { "data-variant": v.variant },
        h("th", { scope: "row" }, v.variant, v.variant === control ? h("span", { class: "tag" }, "control") : null),
        cell(v.users, count(v.users), { "data-metric": "users", class: "num" }),
        cell(v.conversions, count(v.conversions), { "data-metric": "conversions", class: "num" }),
        cell(v.conversion_rate, pct(v.conversion_rate), { "data-metric": "conversion_rate", class: "num" }),
        cell(v.total_revenue, money(v.total_revenue), { "data-metric": "total_revenue", class: "num" }),
        cell(v.revenue_per_user, money(v.revenue_per_user), { "data-metric": "revenue_per_user", class: "num" })))));
}

function comparisonsTable(data) {
  const confidence = data.options.confidence;
  const level = `${Math.round(confidence * 100)}%`;
  const guarded = data.comparisons.some((c) => c.guardrail);
  return h("table", { id: "comparisons" },
    h("thead", {}, h("tr", {}, ["Variant", "Metric", "Control", "Variant's", `Lift (${level} interval)`,
      "Difference", "p-value", "Chance to win", ...(guarded ? ["Guardrail"] : [])].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, data.comparisons.map((c) => {
      const guard = !guarded ? [] : [c.guardrail
        ? cell(c.guardrail.non_inferior ? 1 : 0, c.guardrail.status !== "ok" ? (c.guardrail.message || c.guardrail.status)
          : `${c.guardrail.non_inferior ? "non-inferior" : "not shown non-inferior"} at −${pct(c.guardrail.margin)}`,
               { "data-field": "guardrail" })
        : h("td", {}, "")];
      const kind = outcome(c, confidence);
      const r = c.relative;
      const head = [h("th", { scope: "row" }, c.variant), h("td", {}, METRIC_LABELS[c.metric] || c.metric),
        cell(c.control_mean, metricValue(c.metric, c.control_mean), { class: "num" }),
        cell(c.treatment_mean, metricValue(c.metric, c.treatment_mean), { class: "num" })];
      if (kind === "unavailable") {
        return h("tr", { "data-variant": c.variant, "data-metric": c.metric, class: "unavailable" }, head,
          h("td", { colspan: 4, class: "message", "data-field": "message" }, c.message || c.status), ...guard);
      }
      const lift = r.status === "ok"
        ? [signed(pct(r.estimate), r.estimate),
           h("span", { class: "ci" }, `${signed(pct(r.ci_low), r.ci_low)} to ${signed(pct(r.ci_high), r.ci_high)}`)]
        : h("span", { class: "muted" }, r.message || "no relative lift");
      return h("tr", { "data-variant": c.variant, "data-metric": c.metric, "data-outcome": kind, class: kind }, head,
        cell(r.status === "ok" ? r.estimate : "", lift, { "data-field": "relative_lift", class: "num",
                                                         "data-ci-low": r.ci_low ?? "", "data-ci-high": r.ci_high ?? "" }),
        cell(c.absolute.estimate, difference(c.metric, c.absolute), { "data-field": "absolute_lift", class: "num" }),
        cell(c.adjusted_p_value, pValue(c.adjusted_p_value), { "data-field": "p_value", class: "num" }),
        cell(c.chance_to_win, pct(c.chance_to_win), { "data-field": "chance_to_win", class: "num" }), ...guard);
    })));
}

function segmentsTable(data) {
  const name = { device: "Device", country: "Country", event_type: "Event type" }[data.options.dimension];
  return h("table", { id: "segments" },
    h("thead", {}, h("tr", {}, [name, "Variant", "Users", "Conversions", "Conversion rate", "Revenue per user"]
      .map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, data.segments.map((s) =>
      h("tr", { "data-segment": s.segment, "data-variant": s.variant },
        h("td", {}, s.segment || "(none)"), h("td", {}, s.variant),
        cell(s.users, count(s.users), { "data-metric": "users", class: "num" }),
        cell(s.conversions, count(s.conversions), { "data-metric": "conversions", class: "num" }),
        cell(s.conversion_rate, pct(s.conversion_rate), { "data-metric": "conversion_rate", class: "num" }),
        cell(s.revenue_per_user, money(s.revenue_per_user), { "data-metric": "revenue_per_user", class: "num" })))));
}

// The rows each chart draws (its spec is in charts.mjs).
function forestRows(data) {
  const confidence = data.options.confidence;
  return data.comparisons.filter((c) => c.relative.status === "ok").map((c) => ({
    row: `${c.variant} · ${METRIC_LABELS[c.metric] || c.metric}`, estimate: c.relative.estimate,
    low: c.relative.ci_low, high: c.relative.ci_high, outcome: outcome(c, confidence) }));
}

// The 12 segments with the most users, ranked by them.
function segmentRows(data) {
  const users = new Map(); // not an object: a segment may be named "__proto__"
  for (const s of data.segments) users.set(s.segment, (users.get(s.segment) || 0) + s.users);
  const rank = new Map([...users].sort((a, b) => b[1] - a[1]).slice(0, 12).map(([k], i) => [k, i]));
  return data.segments.filter((s) => rank.has(s.segment)).map((s) => ({ ...s, rank: rank.get(s.segment) }));
}

let testView = null; // the test's page once built: its controls stay, its results are redrawn

async function showTest(testId, force, mine) {
  const data = await api(`/api/tests/${encodeURIComponent(testId)}?${testQuery()}`);
  if (mine !== latest) return;
  lastFetched = Date.now();
  const { as_of, elapsed_ms, ...shown } = data;
  const key = JSON.stringify(shown);
  if (key === lastShown && !force) return;
  lastShown = key;
  const main = document.getElementById("main");
  if (!testView) {
    const plan = data.test.experiment;
    testView = {
      status: h("span", {}),
      facts: h("p", { class: "muted", id: "facts" }),
      results: h("div", { id: "results" }),
    };
    const dimension = h("select", { name: "dimension", id: "dimension", "aria-label": "Break down by" },
      [["device", "device"], ["country", "country"], ["event_type", "event type"]]
        .map(([v, t]) => h("option", { value: v, selected: v === data.options.dimension }, t)));
    dimension.addEventListener("change", () => { setQuery({ dimension: dimension.value }); refresh(true); });
    testView.dimension = dimension;
    main.replaceChildren(...present(
      h("nav", {}, h("a", { href: "/" + (sessionStorage.getItem("abstream-list-query") || "") }, "← all tests")),
      h("h1", {}, data.test.test_id, " ", testView.status),
      plan && plan.hypothesis ? h("p", { class: "hypothesis" }, plan.hypothesis) : null,
      testView.facts,
      controls(data),
      testView.results));
    testView.segmentsHead = h("div", { class: "section-head" }, h("h2", {}, "Segments"),
      h("label", {}, "by ", dimension));
  }
  const t = data.test;
  testView.status.replaceChildren(badge(data.status));
  const plan = t.experiment;
  const split = plan && Object.keys(plan.split).length
    ? ` Planned split ${Object.entries(plan.split).sort(([a], [b]) => (a < b ? -1 : 1)).map(([v, w]) => `${v} ${w}`).join(" / ")}.` : "";
  const ran = plan && plan.start ? ` Started ${when(plan.start)}${plan.stop ? `, stopped ${when(plan.stop)}` : ""}.` : "";
  testView.facts.textContent = `${count(t.events)} events from ${count(t.users)} users, ` +
    `${when(t.first_event)} to ${when(t.last_event)} UTC; ${count(data.events_scanned)} in this range.${split}${ran}`;
  syncControl(data);
  testView.results.replaceChildren(...present(
    healthPanel(data),
    srmBanner(data),
    h("h2", {}, "Variants"),
    h("div", { class: "scroll" }, variantsTable(data)),
    h("h2", {}, `Against ${data.options.control}`),
    data.comparisons.length ? h("div", { class: "scroll" }, comparisonsTable(data))
      : h("p", { class: "muted" }, "One variant only: nothing to compare yet."),
    capNote(data),
    h("div", { id: "forest", class: "chart", role: "img", "aria-label": "Relative lift of each variant and metric with its interval" }),
    h("h2", {}, "Lift over time"),
    h("p", { class: "muted" }, "Each day's cumulative lift with its confidence sequence: the whole curve holds at " +
      "once, so reading it every day is safe."),
    h("div", { id: "lift-chart", class: "chart", role: "img",
               "aria-label": "Cumulative relative lift per variant with its confidence sequence" }),
    h("h2", {}, "Over time (cumulative)"),
    h("div", { class: "pair" },
      h("div", { id: "ts-conversion", class: "chart", role: "img", "aria-label": "Cumulative conversion rate per variant",
                 "data-rows": data.timeseries.length, "data-interval": data.options.interval }),
      h("div", { id: "ts-revenue", class: "chart", role: "img", "aria-label": "Cumulative revenue per user per variant" })),
    testView.segmentsHead,
    h("div", { class: "pair" },
      h("div", { class: "scroll" }, segmentsTable(data)),
      h("div", { id: "segments-chart", class: "chart", role: "img", "aria-label": "Conversion rate by segment" }))));
  await Promise.all([
    data.comparisons.some((c) => c.relative.status === "ok") ? chart("forest", "forest", forestRows(data)) : null,
    chart("ts-conversion", "conversion", data.timeseries),
    chart("ts-revenue", "revenue", data.timeseries),
    chart("segments-chart", "segments", segmentRows(data)),
  ]);
  rendered();
  await drawLift(testId, mine);
}

// One more query, drawn once the rest is: the page's first render does not wait for it (the
// next poll does).
async function drawLift(testId, mine) {
  const target = document.getElementById("lift-chart");
  if (!target) return;
  const q = new URLSearchParams(testQuery());
  for (const k of ["sequential", "exclude_multi_variant_users", "relative_interval", "guardrails", "metric_event_type",
                   "revenue_cap_percentile", "revenue_cap_nonzero_only", "session_metrics", "dimension"]) q.delete(k);
  let data;
  try {
    data = await api(`/api/tests/${encodeURIComponent(testId)}/lift?${q.toString()}`);
  } catch (error) {
    if (mine !== latest) return;
    target.replaceChildren(h("p", { class: "muted" }, `The lift over time could not be computed: ${error.message || error}`));
    return;
  }
  if (mine !== latest) return;
  const values = [];
  for (const bucket of data.lifts) {
    for (const c of bucket.comparisons) {
      if (!["conversion", "revenue_per_user"].includes(c.metric) || c.relative.status !== "ok") continue;
      values.push({ bucket: bucket.bucket, series: `${c.variant} · ${METRIC_LABELS[c.metric] || c.metric}`,
                    estimate: c.relative.estimate, low: c.relative.ci_low, high: c.relative.ci_high });
    }
  }
  target.dataset.points = String(values.length);
  await chart("lift-chart", "lift", values);
  target.dataset.drawn = "true";
}

function syncControl(data) {
  // New variants appear in the control's choices as their first events arrive.
  const select = document.querySelector('#controls select[name="control"]');
  if (!select) return;
  const have = [...select.options].map((o) => o.value).join("\n");
  if (have !== data.test.variants.join("\n")) {
    select.replaceChildren(...data.test.variants.map((v) => h("option", { value: v }, v)));
  }
  select.value = data.options.control;
}

// ---- polling -------------------------------------------------------------------------------

function route() {
  const match = location.pathname.match(/^\/tests\/(.+)$/);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return match[1]; // a stray "%": the id as written
  }
}

async function refresh(force) {
  // A poll while an answer is still awaited is skipped: a slow server would otherwise get a
  // request more every POLL_MS from each open page, and answers out of order drew older data.
  if (!force && (inFlight || Date.now() < pausedUntil)) return;
  const mine = ++latest;
  inFlight++;
  const testId = route();
  try {
    if (testId === null) {
      sessionStorage.setItem("abstream-list-query", location.search);
      await showList(mine);
    } else {
      await showTest(testId, force, mine);
    }
    if (mine === latest) showError("");
    failures = 0;
    pausedUntil = 0;
  } catch (error) {
    if (mine !== latest) return;
    if (error.status === 401 || error.status === 403) {
      clearInterval(pollTimer);
      testView = null;
      lastShown = "";
      askForToken(token() ? `The server refused the token: ${error.message}` : `This server needs a token: ${error.message}`);
      return;
    }
    // Polled again after what the server asked (a busy one says Retry-After), and less often
    // while it keeps failing: every open page would otherwise ask every few seconds.
    failures++;
    const wait = Math.max(error.retryAfter * 1000 || 0, Math.min(POLL_MS * 2 ** failures, MOST_BACKOFF_MS));
    pausedUntil = Date.now() + wait;
    showError(`Could not load results: ${error.message}; trying again in ${Math.round(wait / 1000)} s`);
  } finally {
    inFlight--;
  }
}

function tick() {
  const label = document.getElementById("updated");
  if (lastFetched) label.textContent = `updated ${ago(Date.now() - lastFetched)} ago`;
}

function start() {
  document.title = route() ? `${route()} · abstream` : "abstream results";
  clearInterval(pollTimer);
  refresh(true);
  pollTimer = setInterval(() => { if (document.visibilityState === "visible") refresh(false); }, POLL_MS);
}

setInterval(tick, 1000);
if (route()) chartingLoaded();
start();
