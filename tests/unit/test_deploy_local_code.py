"""The local code of a backend: the files of its working directory its imports reach."""

from __future__ import annotations

import textwrap
from pathlib import Path

from servekit._private.deploy.local_code import local_code


def write(directory: Path, files: dict) -> None:
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_only_the_local_modules_its_imports_reach_count(tmp_path: Path) -> None:
    write(tmp_path, {
        "api.py": """
            import json
            import pkg.sub
            from helpers import tool
            from pkg import other

            def lazy():
                import late
        """,
        "helpers/__init__.py": "",
        "helpers/tool.py": "from . import shared\n",
        "helpers/shared.py": "",
        "pkg/__init__.py": "",
        "pkg/sub.py": "from .deep import x\n",
        "pkg/deep.py": "x = 1\n",
        "pkg/other.py": "",
        "late.py": "",
        "unrelated.py": "import api\n",  # imports the backend, is not imported by it
        "model.py": "",
    })
    code = local_code(str(tmp_path), "api")
    assert sorted(code.files) == ["api.py", "helpers/__init__.py", "helpers/shared.py",
                                  "helpers/tool.py", "late.py", "pkg/__init__.py",
                                  "pkg/deep.py", "pkg/other.py", "pkg/sub.py"]


def test_the_hash_of_a_file_changes_with_its_contents_only(tmp_path: Path) -> None:
    write(tmp_path, {"api.py": "import model\n", "model.py": "W = 1\n"})
    before = local_code(str(tmp_path), "api").files
    write(tmp_path, {"slow.py": "import time\n"})
    assert local_code(str(tmp_path), "api").files == before
    write(tmp_path, {"model.py": "W = 2\n"})
    after = local_code(str(tmp_path), "api").files
    assert after["api.py"] == before["api.py"] and after["model.py"] != before["model.py"]


def test_a_file_that_does_not_parse_is_still_hashed(tmp_path: Path) -> None:
    write(tmp_path, {"api.py": "def broken(:\n"})
    assert list(local_code(str(tmp_path), "api").files) == ["api.py"]


def test_the_endpoints_its_code_gets_handles_to_are_found(tmp_path: Path) -> None:
    write(tmp_path, {
        "compose.py": """
            import servekit as serve
            from parts import Part

            class Composer:
                def __init__(self, name):
                    self.iris = serve.connect().get_handle("iris-model")
                    self.other = serve.connect().get_handle(endpoint_name="other")
                    self.dynamic = serve.connect().get_handle(name)
        """,
        "parts.py": "def part(client):\n    return client.get_handle('part', sync=False)\n",
    })
    assert local_code(str(tmp_path), "compose").handles == {"iris-model", "other", "part"}


def test_the_modules_a_reload_forgets_are_those_the_directory_is_the_import_root_of(
        tmp_path: Path) -> None:
    """A deploy from a checkout of a project installed from its ``src/`` (servekit's own
    tests do this) forgets the checkout's modules, never the installed project's."""
    import sys

    from servekit._private.deploy.definition import forget_local_modules, local_modules

    write(tmp_path, {"mod_a1.py": "", "pkg_a1/__init__.py": "", "pkg_a1/sub.py": "",
                     "src/installed_a1/__init__.py": ""})
    sys.path[:0] = [str(tmp_path), str(tmp_path / "src")]
    try:
        import installed_a1  # noqa: F401
        import mod_a1  # noqa: F401
        import pkg_a1.sub  # noqa: F401

        assert sorted(local_modules(str(tmp_path))) == ["mod_a1", "pkg_a1", "pkg_a1.sub"]
        forget_local_modules(str(tmp_path))
        assert "installed_a1" in sys.modules and "mod_a1" not in sys.modules
    finally:
        sys.path.remove(str(tmp_path))
        sys.path.remove(str(tmp_path / "src"))
        sys.modules.pop("installed_a1", None)
