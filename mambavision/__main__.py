"""``python -m mambavision``: the ``mambavision`` command line."""
from .cli import main

raise SystemExit(main())
