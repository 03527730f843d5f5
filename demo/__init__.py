"""The one-command demo: gateway + agent + managed ComfyUI, driven like a platform user."""
