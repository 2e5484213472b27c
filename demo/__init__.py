"""``make demo``: generate a sample CT, segment it and score it (``python -m demo``)."""
