"""``python -m aekt_plugin.bench``: the same as ``aekt bench``."""

from .cli import main

raise SystemExit(main())
