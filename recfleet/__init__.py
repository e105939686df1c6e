"""recfleet: daily personalised playlist recommendations computed by a fleet of CPU workers.

The subpackages live in the repository's top-level folders and install under this
namespace: ``recfleet.api`` (the gateway), ``recfleet.worker`` (the ranking fleet, the
only side that imports torch), ``recfleet.shared`` (what both sides agree on),
``recfleet.offline`` (artifact builds) and ``recfleet.cli`` (the ``recfleet`` command).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recfleet")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0"
