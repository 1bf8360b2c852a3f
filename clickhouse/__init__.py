"""The cluster engine: the contract served by stateless gateways over a ClickHouse cluster.

`sql` writes every statement, `backend` runs them (a cluster, or chDB in the tests), `engine`
implements core/engine.py with them; `cluster` starts a local cluster for trying it (`make
cluster`) and for the tests; `migrate` copies an embedded data directory into a cluster.
"""
