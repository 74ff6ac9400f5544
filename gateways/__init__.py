"""Gateways: the doors into the mesh for people and programs (OpenAI API, Gradio UI)."""
