"""``python -m app``: see app/cli.py."""

import os
import sys

# TensorFlow's C++ start-up chatter is not for users; real errors still reach stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from app.cli import main  # noqa: E402

status = main()
# Every output was written under a temporary name and renamed, and the report file is closed:
# leave without TensorFlow's teardown, which took 0.8 s per process here (one process per case
# is the organisers' protocol). Output streams are flushed first.
sys.stdout.flush()
sys.stderr.flush()
os._exit(status)
