"""The HTTP front end: the proxy process, its connections, and ASGI pass-through."""
