"""The `heartbatch` command line, one module per command:

- :mod:`.run`, :mod:`.watch`, :mod:`.listen`: measuring into a report (their shared set-up,
  options and messages in :mod:`.common`),
- :mod:`.report` (the HTML report), :mod:`.show` (one film drawn), :mod:`.info` (this machine and
  the model), :mod:`.evaluate` (accuracy on labeled images),
- :mod:`.main`: the parser, and what a command raised mapped to an exit status.
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
