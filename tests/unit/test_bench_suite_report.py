"""benchmarks/suite.py's reporting: the latest figures it writes into RESULTS.md; the peers
scenario when LitServe is not installed; how it stops a peer's process group (nothing here
starts a server)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from typing import Any

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks")


def load_suite() -> Any:
    spec = importlib.util.spec_from_file_location("benchmark_suite",
                                                  os.path.join(BENCHMARKS, "suite.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = load_suite()

RESULTS_MD = f"""# Benchmark results

Intro.

{suite.LATEST_BEGIN}
## Latest figures

old table
{suite.LATEST_END}

## History

### An old run

| a | b |
"""


def test_the_latest_figures_replace_only_their_section() -> None:
    text = suite.replace_latest(RESULTS_MD, "## Latest figures\n\nnew table", "RESULTS.md")
    assert text == RESULTS_MD.replace("old table", "new table")
    again = suite.replace_latest(text, "## Latest figures\n\nnewer", "RESULTS.md")
    assert again == text.replace("new table", "newer")


def test_a_file_without_the_markers_is_refused_naming_them() -> None:
    with pytest.raises(ValueError) as error:
        suite.replace_latest("# Benchmark results\n", "table", "notes.md")
    assert "notes.md" in str(error.value) and suite.LATEST_BEGIN in str(error.value)
    swapped = f"{suite.LATEST_END}\n{suite.LATEST_BEGIN}\n"
    with pytest.raises(ValueError):
        suite.replace_latest(swapped, "table", "notes.md")


def test_the_section_says_how_when_and_at_which_commit() -> None:
    results = {"peers.litserve_rps": [951.2, 1020.7, 880.0],
               "peers.servekit_post_rps": [9166.2, 9001.0, 9500.5],
               "cold_start_s": [0.61]}
    section = suite.latest_figures(results, "python benchmarks/suite.py --quick",
                                   "2026-12-07 13:00 UTC", "abc1234", "2 cores")
    assert section.startswith("## Latest figures\n")
    flat = " ".join(section.split())
    assert ("Written by `python benchmarks/suite.py --quick` on 2026-12-07 13:00 UTC at "
            "commit abc1234; 2 cores.") in flat
    assert "| peers.litserve_rps | 951 | 880 | 1,021 | req/s |  |  |" in section
    assert "| peers.servekit_post_rps | 9,166 | 9,001 | 9,500 | req/s |" in section
    assert "| cold_start_s | 0.61 | 0.61 | 0.61 | s | <=0.5 | MISS |" in section
    assert "http.ceiling.rps32" not in section  # (not measured: no row)


def test_a_bad_results_file_is_refused_before_anything_runs(tmp_path: Any,
                                                           capsys: Any) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# no markers\n")
    with pytest.raises(SystemExit):
        suite.main(["--only", "peers", "--results-md", str(notes)])
    captured = capsys.readouterr()
    assert "--results-md" in captured.err and "running" not in captured.out


def test_peers_are_skipped_with_a_line_without_litserve(monkeypatch: Any,
                                                        capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "litserve", None)  # (import litserve raises ImportError)
    assert suite.scenario_peers(1, True) == {}
    assert "peers: skipped (LitServe is not installed: pip install litserve" \
        in capsys.readouterr().out


def test_a_run_that_measured_nothing_leaves_the_file_as_it_was(
        tmp_path: Any, monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "litserve", None)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(RESULTS_MD)
    assert suite.main(["--only", "peers", "--results-md", str(results_md)]) == 0
    assert results_md.read_text() == RESULTS_MD
    assert "nothing was measured" in capsys.readouterr().out


def test_stopping_a_group_stops_the_children_its_leader_started() -> None:
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"],
                              start_new_session=True)
    suite.stop_group(leader)
    assert leader.returncode is not None
    deadline = time.monotonic() + 10  # (until init has reaped the children it inherited)
    while group_exists(leader.pid):
        assert time.monotonic() < deadline, "the group's children outlived stop_group"
        time.sleep(0.01)


def group_exists(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_stopping_a_group_that_has_exited_is_quiet() -> None:
    leader = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    leader.wait()
    suite.stop_group(leader)
