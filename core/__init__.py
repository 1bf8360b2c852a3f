"""The core, which knows neither gRPC nor HTTP nor how events are stored.

- `events`: the event as users send it, its limits, and validation;
- `types`: what crosses the engine seam (queries, batches, results); `engine`: the interface;
- `dataplane`: `Core`, which every transport calls: admission, validation, authorization of
  test prefixes, deadlines, query priority, the analysis (`analysis`) — and the engine;
- `errors`: the one vocabulary of errors, each with its gRPC code and HTTP status;
- `auth`, `admission`, `metrics`, `logs`, `settings`: tokens, limits, Prometheus, JSON logs,
  the settings every part reads.
"""
