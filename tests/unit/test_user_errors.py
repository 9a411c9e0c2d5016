"""Unit tests of how user errors are shown (``servekit._private.user_errors``)."""

from __future__ import annotations

import asyncio
import logging
import pickle

import pytest

from servekit._private import user_errors
from servekit._private.user_errors import FailureLog, dumps_by_value, user_traceback


def user_code(value: int) -> int:
    return {1: 1}[value]


def raised_through_the_loop() -> BaseException:
    """A KeyError of ``user_code``, raised under asyncio's machinery."""
    async def main() -> None:
        await asyncio.get_running_loop().run_in_executor(None, user_code, 2)

    try:
        asyncio.run(main())
    except KeyError as exc:
        return exc
    raise AssertionError("did not raise")


def test_a_user_traceback_keeps_the_users_frames_only() -> None:
    text = user_traceback(raised_through_the_loop())
    assert f'File "{__file__}"' in text and "in user_code" in text
    assert "/asyncio/" not in text and "/concurrent/" not in text  # (stdlib frames)
    assert text.rstrip().endswith("KeyError: 2")


def test_a_user_traceback_keeps_every_frame_when_none_is_the_users() -> None:
    error = None
    try:
        asyncio.run(asyncio.wait_for(asyncio.sleep(1), -1))
    except TimeoutError as exc:
        error = exc
    assert error is not None
    assert "/asyncio/" in user_traceback(error)  # nothing of the user: all is kept


def test_code_pickled_by_value_keeps_its_file_name() -> None:
    made = eval(compile("lambda: 1 / 0", "/work/my_script.py", "eval"))
    loaded = pickle.loads(dumps_by_value(made))
    assert loaded.__code__.co_filename == "/work/my_script.py"
    with pytest.raises(ZeroDivisionError) as info:
        loaded()
    assert str(info.traceback[-1].path).endswith("my_script.py")


def test_a_repeated_failure_is_counted_and_the_next_one_shown_says_how_many(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.ERROR, logger="test.failures")
    failures = FailureLog(logging.getLogger("test.failures"), "clf")
    error = raised_through_the_loop()
    for _ in range(4):
        failures.failed("GET /clf", error)
    assert len(caplog.records) == 1
    assert "Backend clf raised while handling GET /clf:" in caplog.records[0].getMessage()
    monkeypatch.setattr(user_errors, "REPEAT_WINDOW_S", 0.0)
    failures.failed("GET /clf", error)
    assert len(caplog.records) == 2
    assert "3 more like it" in caplog.records[1].getMessage()
