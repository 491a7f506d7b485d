"""``python -m mmkd.export ...``: the same as ``mmkd export ...`` (:mod:`mmkd.interop.to_open_clip`)."""

if __name__ == "__main__":
    import sys

    from mmkd.cli import run_command

    sys.exit(run_command("export", sys.argv[1:], prog="python -m mmkd.export"))
