"""``python -m iii_embedded``: the operator's command line."""

from ._cli import main

raise SystemExit(main())
