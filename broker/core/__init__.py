"""The domain: command lifecycle, lanes, admission, the telemetry guard, dispatch,
sessions, events and vehicle state. Imports neither grpc nor lmdb (tests/test_layout.py)."""
