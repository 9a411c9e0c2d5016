"""Reading and validating a deploy file into a ``DeploySpec``.

Every problem of the file is found in one pass, each naming its place
(``backends[1].config.num_replicas``) and, for a YAML file, its line. An entry with a
problem is still read as far as it can be (without its bad keys), so that what can be
checked of it (its import, its references) is checked too. The problems travel with the spec
(``DeploySpec.problems``): the import of its backends and the plan add theirs, and the plan
raises them all at once. ``load_deploy_file`` and ``parse_deploy_dict`` raise at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from servekit._private.config_checks import (
    check_methods,
    check_name,
    check_route,
    validate_actor_options,
)
from servekit.config import AutoscalingConfig, BackendConfig, HTTPOptions

Place = Tuple[Union[str, int], ...]
Problem = Tuple[Place, str]  # where in the file, what is wrong and how to fix it
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class DeployFileError(ValueError):
    """A deploy file (or dict) that cannot be applied; ``errors`` lists every problem, one
    line each, naming its place in the file."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


_EntryT = TypeVar("_EntryT", bound=_Entry)
_ModelT = TypeVar("_ModelT", bound=BaseModel)


class EnvEntry(_Entry):
    """Another interpreter for a backend's replicas: ``{conda: name}`` or
    ``{virtualenv: path}``."""

    conda: Optional[str] = None
    virtualenv: Optional[str] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvEntry:
        if (self.conda is None) == (self.virtualenv is None):
            raise ValueError("give exactly one of conda (an environment name) or "
                             "virtualenv (a path)")
        return self


class BackendEntry(_Entry):
    name: str = Field(min_length=1)
    import_path: str = Field(min_length=1)
    working_dir: Optional[str] = Field(default=None, min_length=1)
    init_args: List[Any] = Field(default_factory=list)
    ray_actor_options: Dict[str, Any] = Field(default_factory=dict)
    env: Optional[EnvEntry] = None
    config: Dict[str, Any] = Field(default_factory=dict)


class EndpointEntry(_Entry):
    name: str = Field(min_length=1)
    route: Optional[str] = None
    methods: List[str] = Field(default_factory=lambda: ["GET"], min_length=1)
    traffic: Dict[str, float] = Field(min_length=1)
    shadows: Dict[str, float] = Field(default_factory=dict)


class DeployFileModel(_Entry):
    """The top level; entries are validated one by one, so every bad entry is reported."""

    name: Optional[str] = None
    working_dir: Optional[str] = Field(default=None, min_length=1)
    http_options: Optional[Dict[str, Any]] = None
    backends: List[Dict[str, Any]] = Field(default_factory=list)
    endpoints: List[Dict[str, Any]] = Field(default_factory=list)


# Every key a deploy file may hold somewhere: what an unknown key is compared with.
_KEYS = frozenset(key for model in (DeployFileModel, BackendEntry, EndpointEntry, EnvEntry,
                                    BackendConfig, AutoscalingConfig, HTTPOptions)
                  for key in model.model_fields)


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One backend as the file describes it."""

    name: str
    import_path: str
    init_args: List[Any]
    ray_actor_options: Dict[str, Any]
    env: Optional[Dict[str, str]]
    config: BackendConfig
    place: Place  # ("backends", 1), for messages
    working_dir: str  # absolute: where its import path is found


@dataclasses.dataclass(frozen=True)
class EndpointSpec:
    """One endpoint as the file describes it (methods upper-cased and sorted)."""

    name: str
    route: Optional[str]
    methods: List[str]
    traffic: Dict[str, float]
    shadows: Dict[str, float]
    place: Place


@dataclasses.dataclass(frozen=True)
class DeploySpec:
    """What a deploy file asks for. ``name`` marks what it makes (``--prune`` deletes only
    what was made under the same name); ``directory`` is where its import paths are found
    (its ``working_dir``, by default the file's directory); ``http_options`` are the options
    the file sets, or None. ``problems`` are those found reading it: a spec with problems is
    never applied. ``declared_backends`` names every backend entry, valid or not (an
    endpoint naming a bad one is not told the backend is missing)."""

    http_options: Optional[Dict[str, Any]]
    backends: Dict[str, BackendSpec]
    endpoints: Dict[str, EndpointSpec]
    directory: str
    origin: Optional[str] = None  # the file's path, for messages
    lines: Dict[Place, int] = dataclasses.field(default_factory=dict)
    name: str = "deploy"
    problems: Tuple[Problem, ...] = ()
    declared_backends: FrozenSet[str] = frozenset()

    def where(self, place: Place) -> str:
        """``deploy.yaml:12: backends[1].config`` for a place of this spec."""
        return where(self.origin, self.lines, place)

    def error(self, problems: Iterable[Problem]) -> DeployFileError:
        """One error listing ``problems`` in the order of the file, each with its place."""
        ordered = sorted(problems, key=lambda problem: _line(self.lines, problem[0]))
        return DeployFileError([f"{self.where(place)}: {message}" for place, message in ordered])

    def check(self) -> DeploySpec:
        """This spec, if reading it found no problem.

        Raises:
            DeployFileError: every problem found reading it.
        """
        if self.problems:
            raise self.error(self.problems)
        return self


def format_place(place: Place) -> str:
    """``("backends", 1, "config", "num_replicas")`` -> ``backends[1].config.num_replicas``."""
    text = ""
    for part in place:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text or "(top level)"


def where(origin: Optional[str], lines: Dict[Place, int], place: Place) -> str:
    """A place with its file and line: ``deploy.yaml:12: backends[1].config`` (the line of
    the nearest enclosing node the file has; no file, no line for a dict)."""
    line = _line(lines, place)
    if origin is None:
        return format_place(place)
    return f"{origin}:{line}: {format_place(place)}" if line else \
        f"{origin}: {format_place(place)}"


def _line(lines: Dict[Place, int], place: Place) -> int:
    """The line of ``place`` or of its nearest enclosing node; 0 if none is known."""
    while place and place not in lines:
        place = place[:-1]
    return lines.get(place, 0)


class _Problems:
    """Collects the problems of one file."""

    def __init__(self) -> None:
        self.found: List[Problem] = []

    def add(self, place: Place, message: str) -> None:
        self.found.append((place, message))

    def add_validation(self, prefix: Place, error: ValidationError) -> None:
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "missing":
                message = "missing (required)"
            elif item["type"] == "extra_forbidden":
                message = _unknown_key(str(item["loc"][-1]))
            self.add(prefix + tuple(item["loc"]), message)


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, _KEYS, n=1, cutoff=0.7)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}remove it, or check its spelling)"


def _validated(model: type[_ModelT], data: Any, place: Place,
               problems: _Problems) -> Optional[_ModelT]:
    """``data`` as a ``model``, its problems added; if it has some, it is validated again
    without the keys they are about, so that the rest of it can still be checked (None if
    even that fails)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems.add_validation(place, exc)
        if not isinstance(data, dict):
            return None
        bad = {item["loc"][0] for item in exc.errors() if item["loc"]}
        try:
            return model.model_validate({k: v for k, v in data.items() if k not in bad})
        except ValidationError:
            return None


def load_deploy_file(path: str) -> DeploySpec:
    """Read and validate the deploy file at ``path`` (YAML).

    Raises:
        DeployFileError: the file cannot be read, is not YAML, or describes something
            invalid (every problem, each with its place and line).
    """
    return read_deploy_file(path).check()


def read_deploy_file(path: str) -> DeploySpec:
    """Read the deploy file at ``path`` (YAML); what is wrong with its contents is in the
    spec's ``problems``. Its name is by default the file's, without extension.

    Raises:
        DeployFileError: the file cannot be read, or is not YAML.
    """
    import yaml

    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise DeployFileError([f"{path}: cannot be read: {exc.strerror or exc}"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise DeployFileError([f"{path}:{line} not valid YAML: {problem}"]) from None
    lines: Dict[Place, int] = {}
    if node is not None:
        _node_lines(node, (), lines)
    return read_deploy_dict({} if data is None else data,
                            os.path.dirname(os.path.abspath(path)), origin=path, lines=lines,
                            default_name=os.path.splitext(os.path.basename(path))[0])


def _node_lines(node: Any, place: Place, lines: Dict[Place, int]) -> None:
    """Record the line (1-based) of every node of a composed YAML document by its place."""
    import yaml

    lines[place] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _node_lines(value, place + (key.value,), lines)
            # the key's line, not its value's (a block value starts on the next line)
            lines[place + (key.value,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, place + (index,), lines)


def parse_deploy_dict(data: Any, directory: str, *, origin: Optional[str] = None,
                      lines: Optional[Dict[Place, int]] = None) -> DeploySpec:
    """Validate a deploy file's contents; import paths are found in ``directory`` (unless
    it sets ``working_dir``).

    Raises:
        DeployFileError: every problem, each with its place (and line, given ``lines``).
    """
    return read_deploy_dict(data, directory, origin=origin, lines=lines).check()


def read_deploy_dict(data: Any, directory: str, *, origin: Optional[str] = None,
                     lines: Optional[Dict[Place, int]] = None,
                     default_name: str = "deploy") -> DeploySpec:
    """A deploy file's contents as a spec, with the problems found in them; a relative
    ``working_dir`` is taken from ``directory``.

    Raises:
        DeployFileError: ``data`` is not a mapping (nothing in it can be read).
    """
    lines = dict(lines or {})
    problems = _Problems()
    if not isinstance(data, dict):
        raise DeployFileError([f"{where(origin, lines, ())}: a deploy file is a mapping with "
                               f"name, working_dir, http_options, backends and endpoints; got "
                               f"{type(data).__name__}"])
    model = _validated(DeployFileModel, data, (), problems) or DeployFileModel()
    if model.http_options is not None:
        try:
            HTTPOptions.model_validate(model.http_options)
        except ValidationError as exc:
            problems.add_validation(("http_options",), exc)
    name = default_name if model.name is None else model.name
    try:
        check_name(name)
    except (TypeError, ValueError) as exc:
        problems.add(("name",), f"{exc}; the name marks what this file makes (default: the "
                                "file's name without extension)")
    if model.working_dir is not None:
        directory = os.path.join(directory, os.path.expanduser(model.working_dir))
        if not os.path.isdir(directory):
            problems.add(("working_dir",), f"{directory!r} is not a directory; give the "
                                           "directory the backends' modules are in")
    directory = os.path.abspath(directory)
    backend_entries = _entries(BackendEntry, "backends", model.backends, problems)
    backends = _backends(backend_entries, directory, problems)
    endpoints = _endpoints(_entries(EndpointEntry, "endpoints", model.endpoints, problems),
                           problems)
    declared = frozenset(item["name"] for item in model.backends
                         if isinstance(item, dict) and isinstance(item.get("name"), str))
    return DeploySpec(model.http_options, backends, endpoints, directory, origin, lines, name,
                      tuple(problems.found), declared)


def _entries(model: type[_EntryT], key: str, items: List[Dict[str, Any]],
             problems: _Problems) -> List[Tuple[int, _EntryT]]:
    """The items that are valid ``model`` entries, with their index; problems for the rest."""
    valid = []
    for index, item in enumerate(items):
        entry = _validated(model, item, (key, index), problems)
        if entry is not None:
            valid.append((index, entry))
    return valid


def _backends(entries: List[Tuple[int, BackendEntry]], directory: str,
              problems: _Problems) -> Dict[str, BackendSpec]:
    """The backends of the file; one with a bad config or bad actor options is kept without
    them (its import is still checked), one with a bad or repeated name is not."""
    backends: Dict[str, BackendSpec] = {}
    first_at: Dict[str, Place] = {}  # where each name was first defined, valid or not
    for index, entry in entries:
        place: Place = ("backends", index)
        try:
            check_name(entry.name)
        except (TypeError, ValueError) as exc:
            problems.add(place + ("name",), str(exc))
            continue
        if entry.name in first_at:
            problems.add(place + ("name",), f"backend {entry.name!r} is already defined at "
                                            f"{format_place(first_at[entry.name])}")
            continue
        first_at[entry.name] = place
        config = _validated(BackendConfig, entry.config, place + ("config",), problems) or \
            BackendConfig()
        try:
            actor_options = validate_actor_options(entry.ray_actor_options)
        except (TypeError, ValueError) as exc:
            problems.add(place + ("ray_actor_options",), str(exc))
            actor_options = {}
        working_dir = directory
        if entry.working_dir is not None:
            working_dir = os.path.abspath(os.path.join(directory,
                                                       os.path.expanduser(entry.working_dir)))
            if not os.path.isdir(working_dir):
                problems.add(place + ("working_dir",), f"{working_dir!r} is not a directory; "
                                                       "give the directory its module is in")
        env = None if entry.env is None else entry.env.model_dump(exclude_none=True)
        backends[entry.name] = BackendSpec(entry.name, entry.import_path, entry.init_args,
                                           actor_options, env, config, place, working_dir)
    return backends


def _endpoints(entries: List[Tuple[int, EndpointEntry]],
               problems: _Problems) -> Dict[str, EndpointSpec]:
    endpoints: Dict[str, EndpointSpec] = {}
    routes: Dict[str, str] = {}
    for index, entry in entries:
        place: Place = ("endpoints", index)
        try:
            check_name(entry.name)
        except (TypeError, ValueError) as exc:
            problems.add(place + ("name",), str(exc))
            continue
        if entry.name in endpoints:
            problems.add(place + ("name",), f"endpoint {entry.name!r} is already defined at "
                                            f"{format_place(endpoints[entry.name].place)}")
            continue
        try:
            methods = check_methods(entry.methods)
        except (TypeError, ValueError) as exc:
            problems.add(place + ("methods",), str(exc))
            methods = []
        if entry.route is not None:
            try:
                check_route(entry.route)
            except (TypeError, ValueError) as exc:
                problems.add(place + ("route",), str(exc))
            else:
                if entry.route in routes:
                    problems.add(place + ("route",), f"{entry.route!r} is already the "
                                                     f"route of {routes[entry.route]}")
                else:
                    routes[entry.route] = format_place(place)
        for backend, weight in entry.traffic.items():
            if not weight >= 0 or math.isinf(weight):
                problems.add(place + ("traffic", backend), f"weight {weight!r} must be >= 0")
        total = math.fsum(entry.traffic.values())
        if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-8):
            problems.add(place + ("traffic",), f"weights sum to {total:g}, not 1")
        for backend, proportion in entry.shadows.items():
            if not 0 < proportion <= 1:
                problems.add(place + ("shadows", backend),
                             f"proportion {proportion!r} must be in (0, 1]; leave a shadow "
                             "out to remove it")
        endpoints[entry.name] = EndpointSpec(
            entry.name, entry.route, methods,
            {tag: float(w) for tag, w in entry.traffic.items()},
            {tag: float(p) for tag, p in entry.shadows.items()}, place)
    return endpoints
