"""``python -m mmkd.push ...``: the same as ``mmkd push ...`` (:mod:`mmkd.hub`)."""

if __name__ == "__main__":
    import sys

    from mmkd.cli import main

    sys.exit(main(["push", *sys.argv[1:]]))
