"""Synthetic abdominal contrast CT cases with liver, kidney, spleen and pancreas labels.

Used as the demo input, by the tests, and as training data.  See :mod:`synthetic.generator`.
"""

from synthetic.generator import (LABELS, CaseGeometry, generate_case, random_geometry,
                                 write_case)

__all__ = ["LABELS", "CaseGeometry", "generate_case", "random_geometry", "write_case"]
