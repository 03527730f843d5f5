"""Runtimes the agent drives (ComfyUI, Nerfstudio) behind one protocol.

And the subprocess tools they share: `agent.runtimes.process` runs a command as a managed
process group, with streamed output lines and a stop escalation (SIGINT → SIGTERM → SIGKILL
to the whole group) that leaves nothing behind.
"""
