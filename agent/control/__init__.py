"""The agent's link to the gateway: the WebSocket shell around the protocol session."""
