"""``python -m deltahub.testing.hub_server --root DIR [--host H] [--port N] [--token T] ...``."""

from ._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
