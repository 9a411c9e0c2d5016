"""Backends whose module imports nothing: a replica that imports one loads only what
servekit itself needs (this directory is on the workers' sys.path)."""


def noop(request: object) -> str:
    return "ok"
