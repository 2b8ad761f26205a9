"""The container entrypoint, split by job: :mod:`.config` (what to serve), :mod:`.identity`
(which snapshot is this container's), :mod:`.supervisor` (PID 1: signals, reaping, PIDs),
:mod:`.logs` (the server log on stdout), :mod:`.main` (restore or cold-start, then serve)."""
