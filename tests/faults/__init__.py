"""Fault injection: run batches through a real gateway and real workers while something
breaks, then check the promise (tests/support/invariants.py).

The harness lives in tests/support: the fleet (fleet.py), batches (batches.py), private
RabbitMQ and Redis (services.py), a TCP proxy (proxy.py) and the figures lines
(reports.py); conftest.py here holds the fixtures.
"""
