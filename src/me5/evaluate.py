"""``python -m me5.evaluate``: evaluate a saved model, :mod:`me5.app.evaluate` (the app layer; this name is the
stable command)."""

if __name__ == "__main__":
    import sys

    from me5.app.evaluate import main

    sys.exit(main())
