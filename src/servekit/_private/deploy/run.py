"""``servekit run``: an instance in the foreground, applied from a deploy file or a
``module:function``, applied again when a source file changes.

The instance is not detached: its processes write to this terminal, and they all end with
this process (Ctrl-C or SIGTERM shut it down). A reload that fails — an import error, an
invalid file, a constructor that raises — changes nothing that runs (a failed replacement
rolls back), so the previous version keeps serving; the error is printed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any, Callable, Dict, Optional

from servekit._private.deploy.apply import apply_plan, plan_deploy
from servekit._private.deploy.recording import record
from servekit._private.deploy.schema import DeploySpec, read_deploy_dict, read_deploy_file

# Milliseconds of quiet after a change before reloading (an editor saves in bursts).
_RELOAD_DEBOUNCE_MS = 200
# Milliseconds the file watcher waits before it yields nothing (its first yield says it
# watches; later empty ones are skipped).
_WATCH_WAKEUP_MS = 200


class DevLoop:
    """Builds the spec of ``target`` (a deploy file's path, or ``module:function``) and
    applies it to an instance.

    Args:
        target: a YAML file, or ``module:function`` (a function taking a client, importable
            from the current directory).
        http_options: HTTP options that override the file's (``host``, ``port``).
        echo: where messages go.
    """

    def __init__(self, target: str, http_options: Dict[str, Any],
                 echo: Callable[[str], None]) -> None:
        self.target = target
        self.echo = echo
        self.is_file = os.path.isfile(target) or target.endswith((".yaml", ".yml"))
        if not self.is_file and ":" not in target:
            raise ValueError(f"{target!r} is neither a deploy file nor 'module:function'.")
        self.directory = os.path.dirname(os.path.abspath(target)) if self.is_file else \
            os.getcwd()
        self._http_options = http_options

    def spec(self) -> DeploySpec:
        """The spec of the target as its files are now (code imported afresh), with the
        problems found in it (a plan raises them).

        Raises:
            DeployFileError: a file that cannot be read or is not YAML; or whatever
                importing or calling the function raises.
        """
        if self.is_file:
            spec = read_deploy_file(self.target)
        else:
            spec = self._recorded_spec()
        options = {**(spec.http_options or {}), **self._http_options}
        return dataclasses.replace(spec, http_options=options or None)

    def _recorded_spec(self) -> DeploySpec:
        return read_deploy_dict(record(self.target, self.directory), self.directory,
                                origin=self.target, default_name=self.target)

    def apply(self, client: Any) -> bool:
        """Apply the target's current spec; print the plan, or why it was not applied."""
        try:
            plan = plan_deploy(client, self.spec())
            self.echo(str(plan))
            apply_plan(client, plan)
        except Exception as exc:
            self.echo(f"Not applied (what ran before keeps serving): "
                      f"{type(exc).__name__}: {exc}")
            return False
        return True

    def watch_filter(self, change: Any, path: str) -> bool:
        """The changes that cause a reload: Python files under the directory, and the
        deploy file."""
        if self.is_file and os.path.abspath(path) == os.path.abspath(self.target):
            return True
        return path.endswith(".py") and f"{os.sep}__pycache__{os.sep}" not in path


def run(target: str, reload: bool, http_options: Dict[str, Any],
        echo: Callable[[str], None], ready: Callable[[Any], None]) -> int:
    """Run ``target`` in the foreground until Ctrl-C or SIGTERM; return the exit code.
    ``ready`` is called with the client once the target was first applied.

    Raises:
        DeployFileError / anything the target raises: its first spec is invalid (nothing
            was started).
    """
    import servekit as serve

    loop = DevLoop(target, http_options, echo)
    first = loop.spec()
    plan_deploy(None, first)  # every problem of the target, before anything starts
    # Both stop the loop, also when SIGINT came ignored (a process started in the
    # background by a shell).
    previous = {signum: signal.signal(signum, _interrupt)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    client: Optional[serve.Client] = None
    try:
        client = serve.start(detached=False, http_options=first.http_options)
        echo(f"servekit run: serving {target} (Ctrl-C stops everything).")
        if not reload:
            if not loop.apply(client):
                return 1
            ready(client)
            while True:
                signal.pause()
        import watchfiles

        # The watcher runs before the first apply (its first, empty, yield says so): a
        # change made while the first apply runs is applied next, not missed.
        watcher = watchfiles.watch(*sorted({loop.directory, first.directory}),
                                   watch_filter=loop.watch_filter,
                                   debounce=_RELOAD_DEBOUNCE_MS, step=50,
                                   rust_timeout=_WATCH_WAKEUP_MS, yield_on_timeout=True)
        next(watcher)
        applied = loop.apply(client)
        if applied:
            ready(client)
        echo(f"servekit run: watching {loop.directory} for changes.")
        for changes in watcher:
            if not changes:
                continue
            changed = sorted({os.path.relpath(path, loop.directory) for _, path in changes})
            echo(f"servekit run: {', '.join(changed)} changed; applying again.")
            if loop.apply(client) and not applied:
                applied = True
                ready(client)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if client is not None:
            echo("servekit run: stopping.")
            # A second Ctrl-C must not cut the shutdown short (if this process is killed
            # instead, the instance's supervisor still stops everything).
            for signum in previous:
                signal.signal(signum, signal.SIG_IGN)
            client.shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
