"""``python -m dynaneural.data NAME [NAME ...] [--data-dir DIR] [--force]``: download datasets (``download.main``)."""

from dynaneural.data.download import main

raise SystemExit(main())
