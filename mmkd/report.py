"""``python -m mmkd.report ...``: the same as ``mmkd report ...`` (:mod:`mmkd.reporting.compression`)."""

if __name__ == "__main__":
    import sys

    from mmkd.cli import main

    sys.exit(main(["report", *sys.argv[1:]]))
