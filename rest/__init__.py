"""The HTTP API of the tutorial's platform (Events API, pipes, Data Sources API), served beside
gRPC from the same core: docs/http.md."""
