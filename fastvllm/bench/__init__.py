"""The cold-start ladder: every start-up method, timed side by side in one run.

:func:`run_ladder` runs the matrix (method x server mode x page-cache state x repeat) as a
user would, through the ``fastvllm`` command line, and times each server's decode speed once
it is up; :mod:`.report` turns the raw runs of that one run into the CSV, Markdown table and
PNG.
"""

from .methods import LADDER, Method, unavailable_methods
from .runner import LadderConfig, run_ladder

__all__ = ["LADDER", "Method", "LadderConfig", "run_ladder", "unavailable_methods"]
