"""``python -m app``: see app/cli.py."""

import os
import sys

# TensorFlow's C++ start-up chatter is not for users; real errors still reach stderr.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from app.cli import main  # noqa: E402

sys.exit(main())
