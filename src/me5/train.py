"""``python -m me5.train``: the Hydra app, :mod:`me5.app.train` (the app layer; this name is the stable command)."""

if __name__ == "__main__":
    from me5.app.train import main

    main()
