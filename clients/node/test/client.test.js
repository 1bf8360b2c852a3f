'use strict';
// Run by `make test` (tests/test_node_client.py) against a real server at ABSTREAM_ADDR.

const test = require('node:test');
const assert = require('node:assert/strict');
const { analyticsClient, fieldViolations, grpc, ingest, timestamp, unary } = require('..');

const address = process.env.ABSTREAM_ADDR;
const token = process.env.ABSTREAM_TOKEN; // the server has a tokens file: every call carries it
const client = analyticsClient(address);

test('ingest the tutorial event, then read the summary', async () => {
  const event = {
    timestamp: timestamp('2025-04-28 18:42:22'), user_id: 'user_455', test_id: 'node_test', variant: 'variant_a',
    event_type: 'click', conversion: 1, revenue: 84.55, session_id: 'session_3455', device: 'desktop', country: 'AU',
  };
  const acks = await ingest(client, [[event], [{ ...event, user_id: 'user_456', variant: 'variant_b', conversion: 2 }]], { token });
  assert.equal(acks.length, 2);
  assert.equal(acks[0].accepted, 1);
  assert.equal(acks[1].rejected, 1);
  assert.equal(acks[1].rejections[0].field, 'conversion');
  const summary = await unary(client, 'Summary', { test_id: 'node_test' }, { token });
  assert.deepEqual(summary.rows.map((r) => r.variant), ['variant_a']);
  assert.equal(summary.rows[0].metrics.users, 1);
  assert.equal(summary.rows[0].metrics.total_revenue, 84.55);
  assert.equal(summary.analysis.control_variant, 'variant_a');
});

test('a validation error names the field in its google.rpc.BadRequest', async () => {
  await assert.rejects(unary(client, 'Summary', { test_id: '' }, { token, timeoutMs: 10000 }), (error) => {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual(fieldViolations(error), [{ field: 'test_id', description: 'is required' }]);
    return true;
  });
});

test('a stream that fails rejects with the acks received before it', async () => {
  const event = {
    timestamp: timestamp('2025-04-28 18:42:22'), user_id: 'user_1', test_id: 'node_failed_stream', variant: 'a',
  };
  const tooMany = Array.from({ length: 100001 }, (_, i) => ({ ...event, user_id: `user_${i}` }));
  await assert.rejects(ingest(client, [[event], tooMany], { token }), (error) => {
    assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
    assert.match(error.details, /a batch of 100001 events; at most 100000/);
    assert.equal(error.acks.length, 1);
    assert.equal(error.acks[0].accepted, 1);
    return true;
  });
});

test('batches from an async generator are sent as the stream has room for them', async () => {
  let pulled = 0;
  async function* batches() {
    for (let b = 0; b < 300; b += 1) {
      pulled += 1;
      yield Array.from({ length: 100 }, (_, i) => ({
        timestamp: timestamp('2025-04-28 18:42:22'), user_id: `gen_${b}_${i}`, test_id: 'node_generated', variant: 'a',
      }));
    }
  }
  const acks = await ingest(client, batches(), { token });
  assert.equal(pulled, 300);
  assert.equal(acks.length, 300);
  assert.equal(acks.reduce((n, ack) => n + ack.accepted, 0), 30000);
  const failing = (async function* () { yield [{ timestamp: timestamp('2025-04-28 18:42:22'), user_id: 'u', test_id: 'node_generated', variant: 'a' }]; throw new Error('the file went away'); }());
  await assert.rejects(ingest(client, failing, { token }), /the file went away/);
});

test('times as users write them, and a clear error for one that is not', () => {
  assert.deepEqual(timestamp('2025-04-28 18:42:22'), { seconds: 1745865742, nanos: 0 });
  assert.deepEqual(timestamp('2025-04-28T18:42:22Z'), { seconds: 1745865742, nanos: 0 });
  assert.deepEqual(timestamp('2025-04-28T20:42:22.5+02:00'), { seconds: 1745865742, nanos: 500000000 });
  assert.deepEqual(timestamp('2025-04-28T18:42:22.123456789Z'), { seconds: 1745865742, nanos: 123456789 });
  assert.deepEqual(timestamp('1969-12-31 23:59:59.25'), { seconds: -1, nanos: 250000000 });
  assert.throws(() => timestamp('yesterday'), /"yesterday" is not a time/);
  // As the Python client reads them too: an offset without a colon, a lowercase t and z, a date alone.
  assert.deepEqual(timestamp('2025-04-28T20:42:22+0200'), { seconds: 1745865742, nanos: 0 });
  assert.deepEqual(timestamp('2025-04-28t18:42:22z'), { seconds: 1745865742, nanos: 0 });
  assert.deepEqual(timestamp('2025-04-28'), { seconds: 1745798400, nanos: 0 });
  assert.deepEqual(timestamp(new Date(Date.UTC(2025, 3, 28, 18, 42, 22, 5))), { seconds: 1745865742, nanos: 5000000 });
  // Days that do not exist, hours past 23 and partial dates are refused (Date rolled them over).
  for (const text of ['2025-02-30 10:00:00', '2025-04-28T24:00:00Z', '2025', '2025-04', '2025-04-28T18:42:60Z',
                      '2025-04-28Z', '2025-04-28T18:42:22+25:00']) {
    assert.throws(() => timestamp(text), /is not a time/, text);
  }
});

test('a call without the token is refused, one with it answered', async () => {
  await assert.rejects(unary(client, 'ListTests', {}), (error) => error.code === grpc.status.UNAUTHENTICATED);
  const timedOnly = await unary(client, 'ListTests', {}, 10000).catch((error) => error); // a timeout alone, as before
  assert.equal(timedOnly.code, grpc.status.UNAUTHENTICATED);
  assert.ok(Array.isArray((await unary(client, 'ListTests', {}, { token })).tests));
});

test('a token given with metadata of its own is sent with it', async () => {
  const metadata = new grpc.Metadata();
  metadata.set('x-request-id', 'node-both');
  assert.ok(Array.isArray((await unary(client, 'ListTests', {}, { token, metadata })).tests));
  assert.equal(metadata.get('authorization').length, 0); // the caller's metadata is left as it was
  const event = { timestamp: timestamp('2025-04-28 18:42:22'), user_id: 'u', test_id: 'node_both', variant: 'a' };
  assert.equal((await ingest(client, [[event]], { token, metadata }))[0].accepted, 1);
});

test('batches sent again under a producer id are acknowledged, not stored twice', async () => {
  const batch = (i) => [{ timestamp: timestamp('2025-04-28 18:42:22'), user_id: `user_${i}`, test_id: 'node_producer', variant: 'a' }];
  const first = await ingest(client, [batch(1), batch(2)], { token, producerId: 'node-producer-1' });
  assert.deepEqual(first.map((a) => [a.accepted, a.duplicate]), [[1, false], [1, false]]);
  // The second batch's ack lost, say: it and the next are sent again from its sequence on.
  const again = await ingest(client, [batch(2), batch(3)], { token, producerId: 'node-producer-1', sequence: 2 });
  assert.deepEqual(again.map((a) => a.duplicate), [true, false]);
  const summary = await unary(client, 'Summary', { test_id: 'node_producer' }, { token });
  assert.equal(summary.rows[0].metrics.users, 3);
});

test.after(() => client.close());
