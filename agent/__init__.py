"""cyberun-agent: the bring-your-own-GPU worker agent for the Cyberun platform."""

__version__ = "0.1.0"
PROG = "cyberun-agent"
"""The command's name, as messages print it."""
