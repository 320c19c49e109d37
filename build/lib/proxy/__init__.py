"""chatproxy: an OpenAI-compatible chat proxy with server-side conversation history."""
