"""``python -m mmkd.push ...``: the same as ``mmkd push ...`` (:mod:`mmkd.hub`)."""

if __name__ == "__main__":
    import sys

    from mmkd.cli import run_command

    sys.exit(run_command("push", sys.argv[1:], prog="python -m mmkd.push"))
