"""python -m segany.engine {auto,semi} ... (see cli.py; the worker functions live there so that
spawned worker processes can import them)."""

import sys

from segany.engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
