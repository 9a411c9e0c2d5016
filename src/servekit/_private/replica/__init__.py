"""The replica process: admission, the thread lane, batching, and the ASGI runner."""
