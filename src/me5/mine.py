"""``python -m me5.mine``: mine hard negatives, :mod:`me5.app.mine` (the app layer; this name is the stable
command)."""

if __name__ == "__main__":
    import sys

    from me5.app.mine import main

    sys.exit(main())
