"""An OpenAI-compatible HTTP API over the tiny models of tiny_lm.py, for
examples/openai_server.py: ``/models``, ``/chat/completions`` and ``/completions`` of a
FastAPI app served by an ingress class under the route ``/v1``.

The request's ``model`` field picks the model, which ``get_model`` loads by model
multiplexing (``@serve.multiplexed``): each replica loads the models its requests name and
keeps the two used last. A client that also names the model in the header
``serve_multiplexed_model_id`` (the OpenAI client's ``extra_headers``) is routed to a
replica that holds it; without the header any replica serves it. A streamed answer is
server-sent events (``text/event-stream``), one ``data: {chunk}`` per token and
``data: [DONE]`` last, as OpenAI's clients expect. Errors are OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request, 404 for a
model this server does not have.

Serve it alone from this directory with ``servekit run openai_app:build``; clients then
use ``base_url="http://127.0.0.1:8000/v1"``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncGenerator, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tiny_lm import CATALOG, CharModel

import servekit as serve
from servekit import metrics

CONTEXT_LENGTH = 65536  # tokens (characters) of prompt and completion together
COMPLETIONS_MAX_TOKENS = 16  # /completions' default max_tokens, as OpenAI's


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


app = FastAPI(title="tiny OpenAI-compatible server")


@app.exception_handler(OpenAIError)
async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return error.response()


@app.exception_handler(RequestValidationError)
async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 as OpenAI's 400, naming the first bad field."""
    first = error.errors()[0]
    if first["type"] == "json_invalid":
        return OpenAIError(400, "The request body is not valid JSON: "
                           f"{first['ctx']['error']}").response()
    location = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(location) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"{param or 'The request body'}: {message}"
    return OpenAIError(400, message, param).response()


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What both completion APIs share. Unknown fields are refused (400), never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"{n} is not supported: this server generates one choice per "
                             "request; send n=1 or leave it out")
        return n

    @field_validator("stop")
    @classmethod
    def stop_sequences(cls, stop: Union[str, list[str], None]) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError(f"{stop!r}: give up to 4 non-empty stop sequences")
        return stops


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: their text
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # max_tokens' newer name

    def prompt(self) -> str:
        """The conversation as the model reads it; the model answers from a new line."""
        lines = [f"{message.role}: {message.text()}" for message in self.messages]
        return "\n".join([*lines, "assistant:\n"])


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, prompt: Union[str, list[str]]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError(f"{len(prompt)} prompts: send one prompt per request")
            return prompt[0]
        return prompt


class Generation:
    """One request's run of a model: the text to send, piece by piece (what may be the start
    of a stop sequence is held back until it is ruled out); then why it finished and how
    many tokens it generated."""

    def __init__(self, model: CharModel, prompt: str, request: SamplingRequest,
                 max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.stops: list[str] = request.stop  # type: ignore[assignment]  # the validator's list
        self.tokens = model.generate(prompt, max_tokens, request.temperature, request.top_p,
                                     request.seed, request.ignore_eos)
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.stopped = False  # set from another thread: the client left

    def __iter__(self) -> Iterator[str]:
        pending = ""
        for token in self.tokens:
            if self.stopped:
                return
            self.completion_tokens += 1
            pending += token
            hits = [at for at in (pending.find(stop) for stop in self.stops) if at >= 0]
            if hits:
                if min(hits):
                    yield pending[:min(hits)]
                self.finish_reason = "stop"
                return
            held = max((n for stop in self.stops for n in range(len(stop), 0, -1)
                        if pending.endswith(stop[:n])), default=0)
            if len(pending) > held:
                yield pending[:len(pending) - held]
                pending = pending[len(pending) - held:]
        if pending:
            yield pending
        self.finish_reason = "length" if self.completion_tokens == self.max_tokens else "stop"

    def close(self) -> None:
        self.tokens.close()  # type: ignore[attr-defined]


def event(data: Any) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@serve.ingress(app)
class OpenAIServer:
    """The OpenAI API over the models of tiny_lm.CATALOG, loaded by each replica on demand."""

    def __init__(self) -> None:
        self.generations = metrics.Counter(
            "openai_generations", "Generations by model and how they finished (abort: the "
            "client left before the end).", tag_keys=("model", "finish_reason"))

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> CharModel:
        """The model named ``model_id``: loaded by the first request for it on this
        replica; beyond two models, the least recently used one is evicted."""
        return CATALOG[model_id].load()

    @app.get("/models")
    def list_models(self) -> dict:
        return {"object": "list", "data": [model_card(name) for name in CATALOG]}

    @app.get("/models/{model_id}")
    def retrieve_model(self, model_id: str) -> dict:
        return model_card(known(model_id))

    @app.post("/chat/completions")
    async def chat_completions(self, request: ChatCompletionRequest) -> Any:
        prompt = request.prompt()
        max_tokens = request.max_completion_tokens or request.max_tokens
        generation = await self._start(request, prompt, max_tokens)
        reply = Reply("chatcmpl", "chat.completion", request, len(prompt))
        if request.stream:
            return self._stream(generation, reply)
        text = await self._whole_text(generation, request.model)
        return reply.whole({"message": {"role": "assistant", "content": text}}, generation)

    @app.post("/completions")
    async def completions(self, request: CompletionRequest) -> Any:
        prompt: str = request.prompt  # type: ignore[assignment]  # the validator's one prompt
        generation = await self._start(request, prompt,
                                      request.max_tokens or COMPLETIONS_MAX_TOKENS)
        reply = Reply("cmpl", "text_completion", request, len(prompt))
        if request.stream:
            return self._stream(generation, reply)
        text = await self._whole_text(generation, request.model)
        return reply.whole({"text": text}, generation)

    async def _start(self, request: SamplingRequest, prompt: str,
                    max_tokens: Optional[int]) -> Generation:
        routed_for = serve.get_multiplexed_model_id()
        if routed_for and routed_for != request.model:
            raise OpenAIError(400, f"The request was routed for the model `{routed_for}` (its "
                              f"header serve_multiplexed_model_id) but names `{request.model}`"
                              "; send the same model in both, or leave the header out",
                              "model")
        model = await self.get_model(known(request.model))
        room = CONTEXT_LENGTH - len(prompt)
        if room < 1:
            raise OpenAIError(400, f"The prompt's {len(prompt)} tokens fill this model's "
                              f"context of {CONTEXT_LENGTH} tokens",
                              "messages" if isinstance(request, ChatCompletionRequest)
                              else "prompt")
        if max_tokens is not None and max_tokens > room:
            raise OpenAIError(400, f"max_tokens={max_tokens} is too many: this model's "
                              f"context is {CONTEXT_LENGTH} tokens and the prompt takes "
                              f"{len(prompt)}; ask for {room} at most", "max_tokens")
        return Generation(model, prompt, request, max_tokens or room)

    async def _whole_text(self, generation: Generation, model: str) -> str:
        """The generation's text, made on a thread (the event loop serves on meanwhile);
        a client that leaves stops it at its next token."""
        try:
            return await asyncio.to_thread(self._run, generation, model)
        except asyncio.CancelledError:
            generation.stopped = True
            raise

    def _run(self, generation: Generation, model: str) -> str:
        try:
            return "".join(generation)
        finally:
            self._count(model, generation.finish_reason or "abort")

    def _stream(self, generation: Generation, reply: Reply) -> StreamingResponse:
        # (a client that leaves: servekit closes the generator, and its finally records it)
        return StreamingResponse(self._events(generation, reply),
                                 media_type="text/event-stream")

    async def _events(self, generation: Generation,
                     reply: Reply) -> AsyncGenerator[str, None]:
        """The chunks of a streamed answer. A client that leaves closes this generator
        (at a ``yield``), which stops the model and counts the generation as aborted."""
        try:
            if reply.chat:
                yield event(reply.chunk("", None, role="assistant"))
            for text in generation:
                yield event(reply.chunk(text, None))
            yield event(reply.chunk(None, generation.finish_reason))
            if reply.include_usage:
                yield event(reply.usage_chunk(generation))
            yield event("[DONE]")
        finally:
            generation.close()
            self._count(reply.model, generation.finish_reason or "abort")

    def _count(self, model: str, finish_reason: Optional[str]) -> None:
        self.generations.inc(tags={"model": model, "finish_reason": str(finish_reason)})


class Reply:
    """The JSON of one answer, whole or as chunks, for either API: chat answers carry a
    ``message`` (chunks: a ``delta``), completions a ``text``."""

    def __init__(self, id_prefix: str, kind: str, request: SamplingRequest,
                 prompt_tokens: int) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.kind, self.model, self.prompt_tokens = kind, request.model, prompt_tokens
        self.created = int(time.time())
        self.include_usage = bool(request.stream_options and
                                  request.stream_options.include_usage)
        self.chat = kind == "chat.completion"

    def whole(self, content: dict, generation: Generation) -> dict:
        choice = {"index": 0, **content, "finish_reason": generation.finish_reason,
                  "logprobs": None}
        return {**self._head(self.kind), "choices": [choice], "usage": self.usage(generation)}

    def chunk(self, text: Optional[str], finish_reason: Optional[str], **delta: str) -> dict:
        content: dict[str, Any]
        if self.chat:
            content = {"delta": {**delta, "content": text} if text is not None else delta}
        else:
            content = {"text": text or ""}
        choice = {"index": 0, **content, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk" if self.chat else self.kind
        return {**self._head(kind), "choices": [choice]}

    def usage_chunk(self, generation: Generation) -> dict:
        kind = "chat.completion.chunk" if self.chat else self.kind
        return {**self._head(kind), "choices": [], "usage": self.usage(generation)}

    def usage(self, generation: Generation) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
                "total_tokens": self.prompt_tokens + generation.completion_tokens}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def known(model_id: str) -> str:
    if model_id not in CATALOG:
        raise OpenAIError(404, f"The model `{model_id}` does not exist. Models served here: "
                          f"{', '.join(CATALOG)} (GET /v1/models).", "model", "model_not_found")
    return model_id


def model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "servekit"}


def build(client: Any) -> None:
    """What ``servekit run openai_app:build`` serves: the API at ``/v1``."""
    client.create_backend("openai", OpenAIServer, config={"num_replicas": 2})
    client.create_endpoint("openai", backend="openai", route="/v1")
