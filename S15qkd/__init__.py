"""QKDServer: one node of a BBM92 quantum key distribution link.

The per-event and per-bit work runs in the Rust extension module ``qkd_core``; this
package holds the orchestration, the classical channel, the web page and the keystore.
"""

__all__ = ["__version__"]

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qkdserver")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
