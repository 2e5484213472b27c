"""``python -m app``: see app/cli.py."""

import os
import sys


def hide_library_messages():
    """Send what C/C++ libraries write to file descriptor 2 (TensorFlow's absl and oneDNN start-up
    lines, ITK's warnings, the NIfTI library's "** ERROR" lines) to /dev/null, while Python's
    sys.stderr (our one line per case, the progress bar, tracebacks of real bugs) keeps the
    terminal through a duplicate of the original descriptor. ``--verbose`` skips this."""
    terminal = os.dup(2)
    sys.stderr.flush()
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                           errors="backslashreplace")
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 2)
    os.close(sink)


def main(argv=None):
    """``python -m app`` and the ``predict`` console script: runs app.cli.main and leaves the
    process with its exit status (never returns)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--verbose" not in argv:
        import warnings

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

        warnings.simplefilter("ignore")  # library deprecation notices: --verbose shows them
        hide_library_messages()

    try:
        from app.cli import main as cli_main

        status = cli_main(argv)
    except KeyboardInterrupt:  # before main() could catch it (while starting)
        print("interrupted", file=sys.stderr)
        status = 130
    # Every output was written under a temporary name and renamed, and the report file is closed:
    # leave without TensorFlow's teardown, which took 0.8 s per process here (one process per case
    # is the organisers' protocol). Output streams are flushed first.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
