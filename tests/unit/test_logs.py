"""A process's log file: JSON lines, the lock that tells a live process's log from an
ended one's, reading the tail and what follows, setting the last instance's logs aside."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from servekit._private.workers.logs import (
    PREVIOUS,
    JSONFormatter,
    LogFile,
    LogTail,
    set_aside_previous,
    written_by_a_live_process,
)


def record(message: str, request_id: str = "-", **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("my.model", logging.INFO, __file__, 1, message, (), None,
                             **extra)  # type: ignore[arg-type]
    made.request_id = request_id
    return made


def test_a_json_line_has_what_a_log_shipper_needs() -> None:
    line = json.loads(JSONFormatter("replica", "clf:v1#ab12").format(record("scored 3",
                                                                            "req-7")))
    assert line.pop("time").endswith("+00:00")
    assert line == {"level": "INFO", "role": "replica", "process": "clf:v1#ab12",
                    "pid": os.getpid(), "logger": "my.model", "message": "scored 3",
                    "request_id": "req-7"}


def test_a_json_line_without_a_request_has_no_request_id_and_keeps_its_traceback() -> None:
    try:
        raise ValueError("bad input")
    except ValueError:
        failed = record("failed")
        failed.exc_info = sys.exc_info()
    line = json.loads(JSONFormatter("controller", "controller").format(failed))
    assert "request_id" not in line
    assert "ValueError: bad input" in line["exception"]
    assert "\n" not in JSONFormatter("proxy", "proxy").format(failed)  # one line


def test_a_log_file_is_held_while_its_handler_lives_and_after_it_is_closed(
        tmp_path: Path) -> None:
    path = str(tmp_path / "replica-x.log")
    handler = LogFile(path)
    try:
        assert written_by_a_live_process(path)
        handler.close()  # as a logging setup of the user's code would
        assert written_by_a_live_process(path)
    finally:
        handler.close()
    assert not written_by_a_live_process(str(tmp_path / "replica-ended.log"))
    (tmp_path / "replica-ended.log").write_text("old\n")
    assert not written_by_a_live_process(str(tmp_path / "replica-ended.log"))


def test_tail_gives_the_last_lines_then_only_whole_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("one\ntwo\nthree\npart")
    tail = LogTail(str(path))
    assert tail.last_lines(2) == "two\nthree\n"
    assert tail.new_text() == ""
    with open(path, "a") as f:
        f.write("ial\nfour\n")
    assert tail.new_text() == "partial\nfour\n"
    assert tail.new_text() == ""


def test_tail_starts_over_on_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("old line\n")
    tail = LogTail(str(path))
    assert tail.last_lines(5) == "old line\n"
    os.replace(path, tmp_path / "a.log.1")
    path.write_text("new\n")
    assert tail.new_text() == "new\n"
    path.unlink()
    assert tail.new_text() == ""


def test_the_last_instances_logs_are_set_aside(tmp_path: Path) -> None:
    (tmp_path / PREVIOUS).mkdir()
    (tmp_path / PREVIOUS / "replica-older.log").write_text("older\n")
    for name in ("controller-controller.log", "controller-controller.log.1", "access.log"):
        (tmp_path / name).write_text(name)
    set_aside_previous(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [PREVIOUS]
    assert sorted(os.listdir(tmp_path / PREVIOUS)) == [
        "access.log", "controller-controller.log", "controller-controller.log.1"]
