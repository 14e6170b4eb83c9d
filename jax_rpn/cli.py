"""The command lines' shared entry: absl's ``app.run`` with input errors as one line."""

import sys
from collections.abc import Callable


def run(main: Callable[[list[str]], object], *, name: str) -> None:
    """``absl.app.run(main)``; a ``ValueError``, ``FileNotFoundError`` or ``FileExistsError``
    (a bad path, a malformed file, a config that does not fit) ends the command with
    ``name: message`` on stderr and exit status 1 instead of a traceback."""
    from absl import app

    def guarded(argv):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            sys.exit(f"{name}: {e}")

    app.run(guarded)
