"""``python -m dynaneural.data NAME [NAME ...] [--data-dir DIR] [--force]``: download datasets (see ``download.main``)."""

from dynaneural.data.download import main

raise SystemExit(main())
