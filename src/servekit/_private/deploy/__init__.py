"""Deploy files and the development loop.

- ``schema``: read and validate a deploy file (or dict) into a ``DeploySpec``; every error
  names its place in the file.
- ``definition``: what a backend of a spec runs: its import resolved, its ``source`` (the
  mark of a file-made backend) and its ``ReplicaConfig``.
- ``state``: the running instance's backends, endpoints and HTTP address, read once.
- ``plan``: compare a spec with the running state: the ordered steps of an apply.
- ``apply``: carry out a plan through a ``Client``.
- ``export``: the running state as a deploy file.
- ``recording``: a stand-in client that records what a ``module:function`` declares.
- ``run``: ``servekit run``: a foreground instance, applied again when sources change.
"""
