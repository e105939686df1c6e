"""Helpers the tests share: settings, private services, fleets, batches, the invariant."""
