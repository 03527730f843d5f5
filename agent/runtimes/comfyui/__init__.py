"""The ComfyUI runtime: client, pure graph handling, supervision, and the Runtime itself."""
