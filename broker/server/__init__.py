"""The composition root: builds the broker from a Config, runs its background loops,
serves gRPC and metrics, shuts down in order."""
