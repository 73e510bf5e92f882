"""``python -m me5.score``: cross-encoder teacher scores, :mod:`me5.app.score` (the app layer; this name is the
stable command)."""

if __name__ == "__main__":
    import sys

    from me5.app.score import main

    sys.exit(main())
