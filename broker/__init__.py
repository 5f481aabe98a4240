"""Vehicle command broker: durable gRPC commands for connected cars."""

__version__ = "0.1.0"
