"""The reference Cyberun gateway: REST API, agent WebSocket endpoint and scheduler.

It is what the agent is tested against, what the demo runs, and what a self-hoster can
start with ``cyberun-gateway serve``. The wire format comes from ``agent.protocol``.
"""
