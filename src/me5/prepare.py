"""``python -m me5.prepare``: raw sources -> parquet shards, :mod:`me5.app.prepare` (the stable command name)."""
import sys

from me5.app.prepare import main

if __name__ == "__main__":
    sys.exit(main())
