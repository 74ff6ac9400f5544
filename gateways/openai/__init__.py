"""The openai gateway."""
