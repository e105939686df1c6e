"""The ``recfleet`` command line: sits on top of every other package; nothing imports it."""
