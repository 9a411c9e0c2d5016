"""The FastAPI app of the ``asgi`` benchmark scenario: one typed route (imported by the
replica, and served by bare uvicorn for the ceiling)."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/ping/{n}")
async def ping(n: int) -> dict:
    return {"n": n}
