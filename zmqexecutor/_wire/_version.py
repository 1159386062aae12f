"""The package version, which the handshake tells the other side.

Runs in any process.
"""

__version__ = "0.1.0"
