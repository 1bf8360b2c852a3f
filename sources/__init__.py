"""Where events come from besides a client: request bodies and files, Kafka topics, object stores."""
