"""The agent's exception tree and its process exit codes.

::

    AgentError                      base of everything the agent raises on purpose
    ├── ConfigError                 invalid configuration (fatal; exit CONFIG)
    ├── CredentialError             missing/malformed credential, or refused by the gateway
    │                               (fatal; exit CREDENTIAL)
    ├── ProtocolError               the peer broke protocol v1 (the session answers with an
    │                               ``error`` message; the connection may be closed)
    └── RetryableError              transient: network, 5xx, 429 — retried with backoff
        └── ConnectionLostError     the gateway connection dropped

Adapters (WebSocket, HTTP, subprocess) translate their library's exceptions into this tree
with ``raise ... from``; nobody outside an adapter catches ``httpx.*`` or ``websockets.*``.
Whether an error is retried is decided by its class, in one place per boundary.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes; systemd units use them (``RestartPreventExitStatus=``).

    0  OK          stopped on request (drain finished, or ``--help``-style commands)
    1  FAILURE     unexpected internal failure; a supervisor should restart the agent
    2  USAGE       bad command line (argparse's own convention)
    3  CONFIG      configuration invalid; restarting will not help until it is fixed
    4  CREDENTIAL  credential missing, malformed, or refused (401/403); do not restart
    5  PROTOCOL    the gateway requires a protocol version this agent lacks (426)
    """

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    CREDENTIAL = 4
    PROTOCOL = 5


class AgentError(Exception):
    """Base of the agent's own exceptions."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(AgentError):
    """Invalid configuration: names the key, where the value came from, and the rule."""

    exit_code = ExitCode.CONFIG

    def __init__(self, key: str, source: str, rule: str) -> None:
        self.key = key
        self.source = source
        self.rule = rule
        super().__init__(f"config error: {key} (from {source}): {rule}")


class CredentialError(AgentError):
    """The credential is missing, malformed, or was refused by the gateway."""

    exit_code = ExitCode.CREDENTIAL


class ProtocolError(AgentError):
    """The peer sent something protocol v1 does not allow."""

    exit_code = ExitCode.PROTOCOL


class RetryableError(AgentError):
    """A transient failure; the caller retries with jittered backoff."""


class ConnectionLostError(RetryableError):
    """The gateway connection dropped."""
