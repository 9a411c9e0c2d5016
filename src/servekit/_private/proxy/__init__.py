"""The HTTP front end: the proxy process, its connections, and ASGI pass-through."""

from servekit._private.proxy import uvicorn_package

uvicorn_package.install()  # before a module of this package imports from uvicorn
