"""Protocol v1 between agent and gateway: messages, codec and the agent's session.

Sans-I/O: nothing in this package imports asyncio, websockets or httpx, reads a clock or
touches a socket. ``agent.control`` is the asyncio shell around :class:`Session`; the
reference gateway imports the messages and codec from here (one source of truth).
"""

from agent.protocol import actions, messages
from agent.protocol.codec import DecodeError, decode_agent, decode_gateway, encode
from agent.protocol.session import Advert, ConnState, Session, SessionConfig

__all__ = [
    "Advert",
    "ConnState",
    "DecodeError",
    "Session",
    "SessionConfig",
    "actions",
    "decode_agent",
    "decode_gateway",
    "encode",
    "messages",
]
