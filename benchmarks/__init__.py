"""Developer benchmarks: speed and memory of prediction, evaluation, training and rendering, and
the fast path's agreement with the reference path. Each module is a command (``python -m
benchmarks.NAME --help``); none is run by the tests' timing."""
