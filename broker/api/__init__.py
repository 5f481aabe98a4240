"""The gRPC adapters: request -> domain call -> response, errors mapped in one place."""
