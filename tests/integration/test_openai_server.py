"""examples/openai_app.py served by a real instance, called over HTTP by the official
``openai`` client, sync and async, streamed and not; and a reader that leaves a stream."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import servekit as serve
from conftest import free_port, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = str(Path(__file__).resolve().parents[2] / "examples")
TIMEOUT = 30
HELLO = [{"role": "user", "content": "Good morrow."}]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The example's API at /v1 of a real instance; one replica with one place, so a request
    that kept its place would hold up every request after it."""
    sys.path.insert(0, EXAMPLES)  # the replicas import the example's modules by name
    try:
        from openai_app import OpenAIServer

        port = free_port()
        client = serve.start(http_options={"port": port})
        try:
            client.create_backend("openai", OpenAIServer,
                                  config={"max_concurrent_queries": 1})
            client.create_endpoint("openai", backend="openai", route="/v1")
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            client.shutdown()
    finally:
        sys.path.remove(EXAMPLES)


@pytest.fixture
def llm(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="unused", timeout=TIMEOUT,
                       max_retries=0) as client:
        yield client


def test_the_models_are_listed_and_retrieved(llm: openai.OpenAI) -> None:
    assert [model.id for model in llm.models.list()] == \
        ["tiny-bard", "tiny-bard-cold", "tiny-chef"]
    assert llm.models.retrieve("tiny-chef").owned_by == "servekit"


def test_a_chat_answer_is_the_same_for_a_seed_and_counts_its_tokens(
        llm: openai.OpenAI) -> None:
    first, again = (llm.chat.completions.create(model="tiny-bard", messages=HELLO, seed=3)
                    for _ in range(2))
    text = first.choices[0].message.content
    assert text and again.choices[0].message.content == text
    assert first.object == "chat.completion" and first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens == len(text)  # a token is a character
    assert first.usage.total_tokens == first.usage.prompt_tokens + len(text)
    short = llm.chat.completions.create(model="tiny-bard", messages=HELLO, seed=3,
                                        max_tokens=5)
    assert short.choices[0].message.content == text[:5]
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5


def test_the_model_field_picks_the_model(llm: openai.OpenAI) -> None:
    """Greedy answers (temperature 0) of models trained on different texts differ."""
    answers = {model: llm.completions.create(model=model, prompt="T", temperature=0,
                                             max_tokens=12).choices[0].text
               for model in ("tiny-bard", "tiny-chef")}
    assert answers["tiny-bard"] != answers["tiny-chef"]


def test_a_streamed_chat_is_server_sent_events_that_add_up_to_the_answer(
        llm: openai.OpenAI, base_url: str) -> None:
    whole = llm.chat.completions.create(model="tiny-chef", messages=HELLO, seed=5)
    chunks = list(llm.chat.completions.create(
        model="tiny-chef", messages=HELLO, seed=5, stream=True,
        stream_options={"include_usage": True}))
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    body = {"model": "tiny-chef", "messages": HELLO, "seed": 5, "stream": True}
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body,
                      timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])
    assert json.loads(events[1][len("data: "):])["choices"][0]["delta"] == \
        {"content": text[0]}


def test_completions_stop_before_a_stop_sequence_streamed_or_not(llm: openai.OpenAI) -> None:
    free = llm.completions.create(model="tiny-bard", prompt="O", seed=11,
                                  max_tokens=200).choices[0].text
    stop = free[3:5]  # appears in the free text: the stopped text ends just before it
    stopped = llm.completions.create(model="tiny-bard", prompt="O", seed=11, max_tokens=200,
                                     stop=[stop])
    assert stopped.object == "text_completion"
    assert stopped.choices[0].text == free[:free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = list(llm.completions.create(model="tiny-bard", prompt="O", seed=11,
                                           max_tokens=200, stop=[stop], stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == stopped.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_the_async_client_streams_and_answers_several_models_at_once(base_url: str) -> None:
    async def main() -> tuple:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", timeout=TIMEOUT,
                                      max_retries=0) as llm:
            answers = await asyncio.gather(*(
                llm.chat.completions.create(model=model, messages=HELLO, seed=1)
                for model in ("tiny-bard", "tiny-bard-cold", "tiny-chef")))
            stream = await llm.chat.completions.create(model="tiny-bard-cold",
                                                       messages=HELLO, seed=1, stream=True)
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
            return [answer.choices[0].message.content for answer in answers], "".join(pieces)

    answers, streamed = asyncio.run(main())
    assert all(answers) and streamed == answers[1]


def test_an_unknown_model_is_a_not_found_error(llm: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            llm.chat.completions.create(model="gpt-4o", messages=HELLO, stream=stream)
        assert caught.value.status_code == 404
        assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
        assert "tiny-bard" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        llm.models.retrieve("gpt-4o")


@pytest.mark.parametrize("arguments, param", [
    ({"n": 2}, "n"),
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"extra_body": {"logit_bias_typo": 1}}, "logit_bias_typo"),
])
def test_a_bad_request_is_a_bad_request_error_naming_the_parameter(
        llm: openai.OpenAI, arguments: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        llm.chat.completions.create(model="tiny-bard", messages=HELLO, **arguments)
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert error["param"] == param and error["type"] == "invalid_request_error"  # type: ignore[index]
    assert param in error["message"]  # type: ignore[index]


def test_a_body_that_is_not_json_is_a_bad_request(base_url: str) -> None:
    for body in (b"{not json", b""):
        response = httpx.post(f"{base_url}/completions", content=body, timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert "body" in error["message"]


def metric_samples(base_url: str) -> Dict[str, list]:
    text = httpx.get(base_url.replace("/v1", "/-/metrics"), timeout=TIMEOUT).text
    found: Dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def metric(found: Dict[str, list], name: str, **labels: str) -> float:
    return sum(sample.value for sample in found.get(name, [])
               if all(sample.labels.get(key) == value for key, value in labels.items()))


def test_a_client_that_closes_a_stream_halfway_stops_the_generation_and_frees_its_place(
        llm: openai.OpenAI, base_url: str) -> None:
    aborted = {"name": "openai_generations_total", "model": "tiny-bard-cold",
               "finish_reason": "abort"}
    before = metric(metric_samples(base_url), **aborted)
    stream = llm.chat.completions.create(model="tiny-bard-cold", messages=HELLO, stream=True,
                                         max_tokens=60000, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    for _ in range(5):  # a few tokens of 60000
        assert next(chunks).choices[0].finish_reason is None
    stream.close()

    def stopped() -> Any:
        found = metric_samples(base_url)
        return metric(found, **aborted) == before + 1 and \
            metric(found, "serve_replica_processing_queries", backend="openai") == 0

    wait_for(stopped, TIMEOUT, "the generation aborted and its replica's place back")
    # The replica's only place is free: the next request is answered.
    answer = llm.chat.completions.create(model="tiny-bard-cold", messages=HELLO, max_tokens=3)
    assert answer.usage.completion_tokens == 3


def test_a_replica_keeps_the_two_models_used_last(llm: openai.OpenAI, base_url: str) -> None:
    """@serve.multiplexed(max_num_models_per_replica=2): the third model evicts one."""
    evictions = metric(metric_samples(base_url), "servekit_multiplexed_model_evictions_total",
                       backend="openai")
    for model in ("tiny-bard", "tiny-bard-cold", "tiny-chef"):
        llm.completions.create(model=model, prompt="T", max_tokens=2)

    def two_held() -> bool:
        found = metric_samples(base_url)
        return metric(found, "servekit_multiplexed_models", backend="openai") == 2 and \
            metric(found, "servekit_multiplexed_model_evictions_total",
                   backend="openai") > evictions

    wait_for(two_held, TIMEOUT, "the replica to hold two models after evicting one")


def test_the_multiplexing_header_routes_the_request_and_must_name_its_model(
        llm: openai.OpenAI) -> None:
    routed = llm.chat.completions.create(
        model="tiny-chef", messages=HELLO, max_tokens=4, seed=5,  # (unseeded: may end early)
        extra_headers={"serve_multiplexed_model_id": "tiny-chef"})
    assert routed.model == "tiny-chef" and routed.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as caught:
        llm.chat.completions.create(model="tiny-bard", messages=HELLO,
                                    extra_headers={"serve_multiplexed_model_id": "tiny-chef"})
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert "tiny-chef" in caught.value.body["message"]  # type: ignore[index]


def test_a_client_that_leaves_before_a_whole_answer_stops_its_generation(
        base_url: str) -> None:
    """A non-streamed answer of 65000 tokens takes seconds; its client gives up after 0.5 s."""
    aborted = {"name": "openai_generations_total", "model": "tiny-chef",
               "finish_reason": "abort"}
    before = metric(metric_samples(base_url), **aborted)
    body = {"model": "tiny-chef", "messages": HELLO, "max_tokens": 65000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/chat/completions", json=body,
                   timeout=httpx.Timeout(TIMEOUT, read=0.5))

    def stopped() -> Any:
        found = metric_samples(base_url)
        return metric(found, **aborted) == before + 1 and \
            metric(found, "serve_replica_processing_queries", backend="openai") == 0

    wait_for(stopped, TIMEOUT, "the generation aborted and its replica's place back")
