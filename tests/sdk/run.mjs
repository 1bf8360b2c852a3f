// Drives @tinybirdco/sdk against a local abstream HTTP API (ABSTREAM_HTTP, ABSTREAM_TOKEN) and
// prints what each call returned or threw, as JSON, for tests/test_http.py to check.
import { createClient } from "@tinybirdco/sdk";

const client = createClient({ baseUrl: process.env.ABSTREAM_HTTP, token: process.env.ABSTREAM_TOKEN, devMode: false });
const wrong = createClient({ baseUrl: process.env.ABSTREAM_HTTP, token: "not-a-token", devMode: false });
const event = (i, extra = {}) => ({
  timestamp: `2025-04-28 18:4${i}:22`, user_id: `sdk_user_${i}`, test_id: "sdk_test", variant: i % 2 ? "variant_a" : "control",
  event_type: "click", conversion: i % 2, revenue: 10.5 * i, session_id: `s${i}`, device: "desktop", country: "AU", ...extra,
});

async function outcome(fn) {
  try {
    return { result: await fn() };
  } catch (e) {
    return { error: { message: e.message, statusCode: e.statusCode, response: e.response } };
  }
}

const out = {
  ingest: await outcome(() => client.ingest("ab_test_events", event(1))),
  batch: await outcome(() => client.ingestBatch("ab_test_events", [event(2), event(3), event(4, { conversion: 7 })])),
  no_wait: await outcome(() => client.ingestBatch("ab_test_events", [event(5)], { wait: false })),
  query: await outcome(() => client.query("test_summary", { test_id: "sdk_test", start_date: "2025-04-01 00:00:00",
                                                          end_date: "2025-04-30 23:59:59" })),
  append: await outcome(() => client.datasources.append("ab_test_events", { file: process.env.ABSTREAM_FILE })),
  unknown_pipe: await outcome(() => client.query("no_such_pipe", {})),
  wrong_token: await outcome(() => wrong.query("test_summary", { test_id: "sdk_test" })),
};
console.log(JSON.stringify(out));
