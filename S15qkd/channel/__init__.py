"""The classical channel between the two nodes of a link: framing, TLS and delivery."""

from .frames import Frame, FrameError, FrameType
from .link import ChannelError, FrameTooLargeError, Link, LinkSettings, LinkState
from .tls import create_node_certificate, make_context

__all__ = ["ChannelError", "Frame", "FrameError", "FrameTooLargeError", "FrameType", "Link",
           "LinkSettings", "LinkState", "create_node_certificate", "make_context"]
