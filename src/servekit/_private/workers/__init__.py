"""Processes themselves: the entry point every servekit process runs, starting and tying them
to their instance, the supervisor, and the instance home."""
