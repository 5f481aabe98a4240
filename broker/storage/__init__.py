"""Durable storage behind one interface (`interface.Store`): LMDB with its group-commit
writer thread for the broker, an in-memory twin for unit tests."""
