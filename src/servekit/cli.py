"""The ``servekit`` command: start, inspect and stop the detached instance of this user, or
the one of a Ray cluster (``--address``).

A mistake (no instance running, a busy port, a bad option) is one line on stderr and exit
code 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TypeVar

import click

try:  # the knobs first: a SERVEKIT_* variable set wrong is a line, not a traceback
    from servekit._private import constants  # noqa: F401
except ValueError as exc:
    raise SystemExit(f"Error: {exc}") from None
import servekit as serve
from servekit._private.deploy.schema import DeployFileError
from servekit._private.runtime import choice
from servekit._private.workers import home
from servekit._private.workers.logs import LOG_SUFFIX, LogTail, written_by_a_live_process
from servekit.config import DeploymentMode

F = TypeVar("F", bound=Callable[..., Any])


def _reachable_address(ctx: click.Context, param: click.Parameter,
                       address: Optional[str]) -> Optional[str]:
    """Refuse a host:port (or ray://host:port) nothing listens on at once, rather than
    after Ray's minute of retries."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return address  # none, or auto
    try:
        socket.create_connection((host, int(port)), timeout=_ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        raise click.BadParameter(f"no Ray cluster answers at {address} "
                                 f"({exc.strerror or exc}); give the address 'ray start' "
                                 "printed, or 'auto'") from None
    return address


# Seconds --address's host:port has to accept a connection.
_ADDRESS_TIMEOUT_S = 5.0

_address = click.option(
    "--address", default=None, callback=_reachable_address,
    help="Use the instance of this Ray cluster (passed to ray.init: auto, host:port or "
         "ray://host:port) instead of this user's embedded one.")


def _user_errors(command: F) -> F:
    """Report servekit's own errors, and a module or file that cannot be used, as one
    line (click prints ``Error: ...``, exits 1)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DeployFileError as exc:  # every problem of a file, one line each
            raise click.ClickException("\n".join(exc.errors)) from None
        except (serve.ServeError, ValueError, TypeError, ImportError, OSError) as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else
                                       type(exc).__name__) from None

    run.__name__ = command.__name__
    run.__doc__ = command.__doc__
    return run  # type: ignore[return-value]


@click.group()
@click.version_option(serve.__version__, prog_name="servekit")
def main() -> None:
    """servekit: serve machine-learning models and Python code behind HTTP and handles."""


@main.command()
@click.option("--http-host", default=None, help="Interface to serve HTTP on [127.0.0.1].")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None,
              help="Port to serve HTTP on [8000, or the port the instance had].")
@click.option("--http-location", type=click.Choice([m.value for m in DeploymentMode]),
              default=None, help="Where HTTP proxies run [HeadOnly].")
@_address
@_user_errors
def start(http_host: Optional[str], http_port: Optional[int],
          http_location: Optional[str], address: Optional[str]) -> None:
    """Start a detached instance (it runs until `servekit shutdown`).

    If the previous instance's processes are gone (a reboot) but its state is still there,
    its backends and endpoints come back, on the port it had unless told otherwise.
    """
    if choice.detached_running(address):
        raise click.ClickException("a servekit instance is already running here; 'servekit "
                                   "status' shows it, 'servekit shutdown' stops it")
    options: Dict[str, Any] = dict(home.saved_http_options() or {}) if address is None else {}
    for key, value in (("host", http_host), ("port", http_port), ("location", http_location)):
        if value is not None:
            options[key] = value
    click.echo(_start_detached(options, address))


def _start_detached(options: Dict[str, Any], address: Optional[str]) -> str:
    """Start a detached instance with ``options``; say what it restored, where it serves."""
    client = serve.start(detached=True, http_options=options or None, address=address)
    state = client.status()
    restored = (f"; restored {len(state['backends'])} backends and "
                f"{len(state['endpoints'])} endpoints") if state["backends"] else ""
    return f"Started a detached servekit instance{restored}.\n{_serving(state)}"


def _serving(state: Dict[str, Any]) -> str:
    """Where the instance whose status is ``state`` serves HTTP."""
    served = sorted({f"http://{p['http'][0]}:{p['http'][1]}" for p in state["processes"]
                     if p["role"] == "proxy" and p.get("http")})
    return f"Serving at {', '.join(served)}" if served else "Serving through handles only " \
        "(no HTTP)"


def _connect(address: Optional[str]) -> serve.Client:
    """The client of the running instance; a CLI error if none runs."""
    if choice.find_detached(address) is None:
        where = "on this Ray cluster" if choice.uses_ray(address) else "here"
        start = "servekit start" + (f" --address {address}" if address else "")
        raise click.ClickException(f"no servekit instance is running {where}; start one "
                                   f"with '{start}'")
    return serve.connect(address)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_address
@_user_errors
def status(as_json: bool, address: Optional[str]) -> None:
    """Show the backends (each HEALTHY, UPDATING, UPSCALING, DOWNSCALING or UNHEALTHY, and
    why), endpoints and processes of the running instance."""
    state = _connect(address).status()
    if as_json:
        click.echo(json.dumps(state, indent=2, sort_keys=True))
        return
    backend_rows = [[tag, b["status"], f"{b['running']}/{b['target']}", _config_cell(b),
                     b["message"]] for tag, b in sorted(state["backends"].items())]
    endpoint_rows = [[name, _route_cell(e), "" if e["route"] is None or e.get("prefix")
                      else ",".join(e["methods"]), _weights(e["traffic"]),
                      _weights(e["shadows"])]
                     for name, e in sorted(state["endpoints"].items())]
    # The multiplexed models replicas hold: a column only when some replica holds one.
    models = any(p.get("models") for p in state["processes"])
    process_rows = [[p["role"], p["name"], str(p["pid"]), p["state"],
                     (p.get("node") or "")[:12], *([",".join(p.get("models") or ())]
                                                   if models else [])]
                    for p in state["processes"]]
    click.echo(_table("BACKENDS", ["backend", "status", "replicas", "config", "message"],
                      backend_rows))
    click.echo(_table("ENDPOINTS", ["endpoint", "route", "methods", "traffic", "shadows"],
                      endpoint_rows))
    click.echo(_table("PROCESSES", ["role", "name", "pid", "state", "node",
                                    *(["models"] if models else [])], process_rows),
               nl=False)


def _config_cell(backend: Dict[str, Any]) -> str:
    """The config fields worth a glance, as replicas apply them (no field left at None)."""
    config = backend["config"]
    shown = ["max_concurrent_queries", "max_batch_size", "sync_threads", "max_surge"]
    return ", ".join(f"{key}={config[key]}" for key in shown if config.get(key) is not None)


def _route_cell(endpoint: Dict[str, Any]) -> str:
    if endpoint["route"] is None:
        return "(handle only)"
    return f"{endpoint['route']} (prefix)" if endpoint.get("prefix") else endpoint["route"]


@main.command()
@click.option("--keep-state", is_flag=True,
              help="Keep the saved state, so that the next `servekit start` restores it.")
@_address
@_user_errors
def shutdown(keep_state: bool, address: Optional[str]) -> None:
    """Stop the running instance: requests in flight finish, then every process stops."""
    _connect(address)._shutdown(keep_state)
    click.echo("The servekit instance was shut down" +
               ("; its state was kept." if keep_state else "."))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--prune", is_flag=True,
              help="Also delete the backends and endpoints that files of this one's name "
                   "made and that are no longer in it (never those of other names or made "
                   "through the Python API).")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--no-wait", is_flag=True,
              help="Return once the instance accepted every step, without waiting for the "
                   "replicas to start (`servekit status` shows how far they are).")
@_address
@_user_errors
def deploy(file: str, prune: bool, dry_run: bool, no_wait: bool,
           address: Optional[str]) -> None:
    """Bring the running instance to what FILE (a YAML deploy file) describes.

    The whole file is checked first (every problem at once); then the plan is printed
    (create, update in place, replace, delete) and applied. If no instance runs, a detached
    one is started with the file's http_options (and shut down again if the apply fails).
    """
    from servekit._private.deploy.apply import load_spec, plan_deploy

    spec = load_spec(file)
    client = serve.connect(address) if choice.find_detached(address) is not None else None
    started: Optional[bool] = None  # whether the instance this started restored a state
    if client is None and not dry_run:
        plan_deploy(None, spec, prune)  # every problem of the file, before anything starts
        options = dict(home.saved_http_options() or {}) if address is None else {}
        click.echo(f"No servekit instance was running. "
                   f"{_start_detached({**options, **(spec.http_options or {})}, address)}")
        client = serve.connect(address)
        started = bool(client._call("status")["backends"])
    try:
        plan = plan_deploy(client, spec, prune)
        click.echo(str(plan))
        if dry_run:
            click.echo("Dry run: nothing was changed" +
                       (" (no instance runs: planned against an empty one)." if client is None
                        else "."))
        elif plan.changes_anything:
            assert client is not None
            _apply_watched(client, plan, wait=not no_wait)
    except Exception:
        if started is not None:
            assert client is not None
            _shut_down_after_failure(client, restored=started)
        raise


def _apply_watched(client: serve.Client, plan: Any, wait: bool) -> None:
    """Apply ``plan``, printing how far the replicas of each backend it changes are as
    they start and stop (``Client.status`` every ``_PROGRESS_PERIOD_S``); without
    ``wait``, return once the instance accepted every step."""
    from servekit._private.deploy.apply import apply_plan

    if not wait:
        with client._without_waiting():
            apply_plan(client, plan)
        click.echo("Accepted: the replicas start and stop in the background; "
                   "`servekit status` shows how far they are.")
        return
    done = threading.Event()
    watcher = threading.Thread(target=_print_progress, args=(client, done),
                               name="servekit-deploy-progress", daemon=True)
    watcher.start()
    try:
        apply_plan(client, plan)
    finally:
        done.set()
        watcher.join()
    click.echo("Applied.")


# Seconds between two looks at the status while a deploy applies.
_PROGRESS_PERIOD_S = 0.25


def _print_progress(client: serve.Client, done: threading.Event) -> None:
    """Until ``done``: a line for each backend whose status or message changed while it
    is not HEALTHY (``iris:v1 UPDATING: rolling out revision 2: 2/5 new replicas ready,
    3 of the old revision running``), and one as it becomes HEALTHY again."""
    shown: Dict[str, str] = {}
    while True:
        finished = done.wait(_PROGRESS_PERIOD_S)
        try:
            backends = client.status()["backends"]
        except Exception:
            return  # the apply says what went wrong
        for tag, backend in sorted(backends.items()):
            line = f"{tag} {backend['status']}: {backend['message']}"
            if line != shown.get(tag, line if backend["status"] == "HEALTHY" else None):
                click.echo(line)
            if backend["status"] != "HEALTHY" or tag in shown:
                shown[tag] = line
        if finished:
            return


def _shut_down_after_failure(client: serve.Client, restored: bool) -> None:
    """Shut down the instance a failed deploy started, so that none is left behind (the
    state it ``restored``, if it found one, is kept)."""
    client._shutdown(keep_state=restored)
    click.echo("The deploy failed, so the instance it started was shut down" +
               (" (the state it restored was kept)." if restored else "."), err=True)


@main.command("config")
@_address
@_user_errors
def config_command(address: Optional[str]) -> None:
    """Print the running instance as a deploy file that `servekit deploy` accepts back.

    Backends made through the Python API cannot be written as a file: they, and the
    endpoints that use them, are listed in a comment at the top and left out.
    """
    from servekit._private.deploy.export import export_config
    from servekit._private.deploy.state import read_state

    exported = export_config(read_state(_connect(address)))
    click.echo(exported.to_yaml(), nl=False)
    if exported.left_out:
        click.echo(f"Note: {len(exported.left_out)} object(s) were left out (listed at the "
                   "top of the file): only what deploy files made can be written as one.",
                   err=True)


@main.command()
@click.argument("target")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the deploy file here [standard output].")
@_user_errors
def build(target: str, output: Optional[str]) -> None:
    """Write the deploy file that TARGET describes: module:function, a function that takes
    a client and creates backends and endpoints (as `servekit run` records it).

    The file records the directory the code was imported from (working_dir), so that
    `servekit deploy` applies it from any directory. It is checked as a deploy would check
    it before it is written.
    """
    from servekit._private.deploy.build import build_deploy_file

    if output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    text = build_deploy_file(target, output)
    if output is None:
        click.echo(text, nl=False)
        return
    with open(output, "w") as f:
        f.write(text)
    click.echo(f"Wrote {output}; `servekit deploy {output}` applies it.", err=True)


@main.command("run")
@click.argument("target")
@click.option("--reload", is_flag=True,
              help="Apply again when a Python file under the target's directory (or the "
                   "deploy file) changes.")
@click.option("--http-host", default=None, help="Interface to serve HTTP on (overrides the "
                                                "file's) [127.0.0.1].")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None,
              help="Port to serve HTTP on (overrides the file's) [8000].")
@_user_errors
def run_command(target: str, reload: bool, http_host: Optional[str],
                http_port: Optional[int]) -> None:
    """Run TARGET in the foreground until Ctrl-C: a deploy file, or module:function (a
    function that takes a client and creates backends and endpoints, as 1.x scripts do).

    Once it is applied, prints where it serves (`Serving at http://HOST:PORT`). The
    instance's logs go to this terminal, and every process it started ends with it.
    """
    from servekit._private.deploy.run import run

    options = {key: value for key, value in (("host", http_host), ("port", http_port))
               if value is not None}
    code = run(target, reload, options, lambda line: click.echo(line, err=True),
               lambda client: click.echo(_serving(client._call("status")), err=True))
    if code:
        raise SystemExit(code)


@main.command()
@click.option("--lines", "-n", type=click.IntRange(1), default=50, show_default=True,
              help="How many of the last lines of each log to show.")
@click.option("--process", default=None,
              help="Only the logs whose name contains this (e.g. proxy, access, a replica "
                   "tag).")
@click.option("--all", "show_all", is_flag=True,
              help="Also the logs of processes that have ended (replicas replaced, scaled "
                   "down or killed).")
@click.option("--follow", "-f", is_flag=True,
              help="Then print new lines as they are written (new processes' too), until "
                   "Ctrl-C.")
@_user_errors
def logs(lines: int, process: Optional[str], show_all: bool, follow: bool) -> None:
    """Show the logs of the detached instance's running processes, and its access log.

    After the instance stopped (`servekit shutdown`, with or without --keep-state), the
    logs of its processes stay until the next one starts; the ones before are in the
    log directory's `previous` folder. (On Ray, the actors' output is in Ray's logs:
    `ray logs`.)
    """
    directory = home.log_dir()
    names = sorted(name for name in os.listdir(directory) if name.endswith(LOG_SUFFIX))
    if not names:
        raise click.ClickException(f"no logs in {directory}: no servekit instance has run "
                                   "here; start one with 'servekit start'")
    names = [name for name in names if process is None or process in name]
    if not names:
        raise click.ClickException(f"no log in {directory} matches --process {process!r}")
    if home.read_record() is None:
        click.echo("No servekit instance is running: these are the logs of the last one.",
                   err=True)
    elif not show_all:
        live = [name for name in names
                if written_by_a_live_process(os.path.join(directory, name))]
        if len(live) < len(names):
            click.echo(f"({len(names) - len(live)} logs of processes that have ended are "
                       "not shown; --all shows them.)", err=True)
        names = live
    tails = {name: LogTail(os.path.join(directory, name)) for name in names}
    for name, tail in tails.items():
        click.echo(f"==> {name} <==")
        click.echo(tail.last_lines(lines), nl=False)
    if follow:
        try:
            _follow(directory, process, tails)
        except KeyboardInterrupt:
            pass


def _follow(directory: str, process: Optional[str], tails: Dict[str, LogTail]) -> None:
    """Print what is written to the logs of ``tails`` and to new logs (whose names
    contain ``process``), a header before each file's lines, until interrupted."""
    known = set(os.listdir(directory))
    last = list(tails)[-1] if tails else None
    while True:
        time.sleep(_FOLLOW_PERIOD_S)
        for name in sorted(set(os.listdir(directory)) - known):
            known.add(name)
            if name.endswith(LOG_SUFFIX) and (process is None or process in name):
                tails[name] = LogTail(os.path.join(directory, name))
        for name, tail in tails.items():
            text = tail.new_text()
            if text:
                if name != last:
                    click.echo(f"\n==> {name} <==")
                    last = name
                click.echo(text, nl=False)


# Seconds between two looks at the log files in `servekit logs --follow`.
_FOLLOW_PERIOD_S = 0.2


def _weights(weights: Dict[str, float]) -> str:
    """``tag=weight, ...``; a tag that holds "=", "," or a space or quote is quoted, so tags
    with colons ("iris:v1") or anything else read back unambiguously."""
    return ", ".join(f"{_quoted(backend)}={weight:g}"
                     for backend, weight in sorted(weights.items()))


def _quoted(tag: str) -> str:
    return json.dumps(tag) if any(c in tag for c in '=, "\'') else tag


def _table(title: str, header: Sequence[str], rows: List[List[str]]) -> str:
    """A titled plain-text table, columns padded to their widest cell."""
    cells = [list(header), *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title]
    for row in cells:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                         strict=True)).rstrip())
    if not rows:
        lines.append("(none)")
    return "\n".join(lines) + "\n\n"


if __name__ == "__main__":
    main()
