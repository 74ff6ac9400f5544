"""The gradio gateway."""
