"""Cohorts: thousands of CT scans segmented on a Ray cluster, resumable (``python -m cohort``).

Outside app/ on purpose: the container that runs predict.sh holds app/ alone; this package
needs Ray and pyarrow (requirements-cohort.txt, ``make cohort``). Details: docs/cohort.md.
"""
