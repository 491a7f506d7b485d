"""``python -m mmkd.report ...``: the same as ``mmkd report ...`` (:mod:`mmkd.reporting.compression`)."""

if __name__ == "__main__":
    import sys

    from mmkd.cli import run_command

    sys.exit(run_command("report", sys.argv[1:], prog="python -m mmkd.report"))
