'use strict';
// abstream's Node client: the services loaded from the repository's own proto files, plus the one
// thing grpc-js leaves to you, reading the google.rpc.BadRequest that explains an INVALID_ARGUMENT.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true, includeDirs: [PROTOS] };

const definition = protoLoader.loadSync(['abstream/v1/analytics.proto', 'abstream/v1/admin.proto'], OPTIONS);
const abstream = grpc.loadPackageDefinition(definition).abstream.v1;

// google.rpc.Status and BadRequest, as the gRPC rich error model defines them.
const rpc = new protobuf.Root().loadSync([path.join(__dirname, 'protos', 'google', 'rpc', 'status.proto'),
  path.join(__dirname, 'protos', 'google', 'rpc', 'error_details.proto')], { keepCase: true });
const Status = rpc.lookupType('google.rpc.Status');
const BadRequest = rpc.lookupType('google.rpc.BadRequest');

/** An AnalyticsService client for `address` ('127.0.0.1:50051'); plaintext unless credentials are given. */
function analyticsClient(address, credentials = grpc.credentials.createInsecure()) {
  return new abstream.AnalyticsService(address, credentials);
}

/** The field violations ({field, description}) a gRPC error carries, or [] when it carries none. */
function fieldViolations(error) {
  const raw = error && error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return [];
  const status = Status.decode(raw);
  return status.details
    .filter((detail) => detail.type_url === 'type.googleapis.com/google.rpc.BadRequest')
    .flatMap((detail) => BadRequest.toObject(BadRequest.decode(detail.value)).field_violations || []);
}

/**
 * Sends batches of events on one IngestEvents stream; resolves with one ack per batch, in order.
 * `batches`: an array, or any iterable or async iterable (a generator reading a file): a batch is
 * taken from it only once the stream has room for it, so memory stays bounded whatever it holds.
 * When the stream fails, rejects with its error, whose `acks` are those received before it: the
 * batches they answer are stored, the others are to be sent again. With `producerId`, batch i
 * carries the sequence `sequence + i` (`sequence` default 1): sent again with the same numbers
 * (a batch whose ack was lost with the stream), a stored batch is acknowledged as a duplicate,
 * not stored twice. `timeoutMs` (30,000) bounds the whole stream.
 */
function ingest(client, batches, options = {}) {
  return new Promise((resolve, reject) => {
    const acks = [];
    let ended = false;
    const call = client.IngestEvents(bearer(options.token, options.metadata), { deadline: Date.now() + (options.timeoutMs || 30000) });
    call.on('data', (ack) => acks.push(ack));
    call.on('error', (error) => { ended = true; reject(Object.assign(error, { acks })); });
    call.on('end', () => { ended = true; resolve(acks); });
    const room = () => new Promise((ready) => { // or the stream's end: the loop then stops
      const events = ['drain', 'close', 'error', 'end', 'status'];
      const go = () => { for (const e of events) call.off(e, go); ready(); };
      for (const e of events) call.on(e, go);
    });
    (async () => {
      let sequence = options.sequence || 1;
      for await (const events of batches) {
        if (ended) return;
        const request = options.producerId ? { events, producer_id: options.producerId, sequence: sequence++ } : { events };
        if (!call.write(request)) await room();
      }
      call.end();
    })().catch((error) => { // the batches' own iterator failed: nothing more is sent
      reject(Object.assign(error, { acks })); // first: the cancel's own error must not be the one said
      ended = true;
      call.cancel();
    });
  });
}

/**
 * Metadata that carries a bearer token, for a server with a tokens file: `metadata` (copied) or
 * new, with the token when one is given (given both, the token was dropped). Metadata, not call
 * credentials: grpc-js refuses those on a plaintext channel.
 */
function bearer(token, metadata) {
  const carried = metadata ? metadata.clone() : new grpc.Metadata();
  if (token) carried.set('authorization', `Bearer ${token}`);
  return carried;
}

/**
 * A unary call as a promise, with a deadline. `options`: { timeoutMs, token, metadata }, or the
 * timeout in milliseconds alone.
 */
function unary(client, method, request, options = {}) {
  const { timeoutMs = 30000, token, metadata } = typeof options === 'number' ? { timeoutMs: options } : options;
  return new Promise((resolve, reject) => {
    client[method](request, bearer(token, metadata), { deadline: Date.now() + timeoutMs },
      (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/**
 * A google.protobuf.Timestamp from a Date, 'YYYY-MM-DD HH:MM[:SS[.fraction]]' (UTC), a date
 * alone (its midnight, UTC) or RFC 3339 (a lowercase t or z, an offset with or without its colon,
 * as the Python client reads them too); a TypeError for anything else (an invalid time used to be
 * sent as the epoch, and Date's own parser took 2025-02-30 for March 2).
 */
const TIME = /^(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?(?:([zZ])|([+-])(\d{2})(?::?(\d{2}))?)?)?$/;

function timestamp(value) {
  const refused = () => new TypeError(`${JSON.stringify(String(value))} is not a time: use 'YYYY-MM-DD HH:MM:SS' (UTC) or RFC 3339`);
  if (value instanceof Date) {
    const millis = value.getTime();
    if (Number.isNaN(millis)) throw refused();
    return { seconds: Math.floor(millis / 1000), nanos: (((millis % 1000) + 1000) % 1000) * 1e6 };
  }
  const m = TIME.exec(String(value).trim());
  if (!m) throw refused();
  const [y, mo, d, h, mi, s, oh, om] = [1, 2, 3, 4, 5, 6, 10, 11].map((i) => Number(m[i] || 0));
  const millis = Date.UTC(y, mo - 1, d, h, mi, s);
  const day = new Date(millis); // a day past its month's end rolls over: refused, as Python refuses it
  if (day.getUTCFullYear() !== y || day.getUTCMonth() !== mo - 1 || day.getUTCDate() !== d || h > 23 || mi > 59
      || s > 59 || oh > 23 || om > 59) throw refused();
  const offset = m[9] ? (m[9] === '-' ? -1 : 1) * (oh * 3600 + om * 60) : 0;
  const nanos = m[7] ? Number(`${m[7]}000000000`.slice(0, 9)) : 0;
  return { seconds: millis / 1000 - offset, nanos };
}

module.exports = { abstream, analyticsClient, bearer, fieldViolations, grpc, ingest, timestamp, unary };
