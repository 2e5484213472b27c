"""Writing a weights folder the Predictor can load: both networks' files and weights.json, put
in place whole or not at all (training snapshots, averaged weights, the published weights' import).
"""

import json
import os
import shutil
from pathlib import Path

from app import method
from app.weights import PROVENANCE, WEIGHTS_FILES


def write_folder(out_dir, models, provenance, fill_from, license_files):
    """Write the weights folder under a temporary name next to it, then rename it into place.

    An existing folder is moved aside first and put back if the rename fails.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    previous = out_dir.with_name(f".{out_dir.name}.previous-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        for network in method.NETWORKS:
            if network in models:
                models[network].save_weights(temporary / WEIGHTS_FILES[network])
            else:
                shutil.copyfile(Path(fill_from) / WEIGHTS_FILES[network],
                                temporary / WEIGHTS_FILES[network])
        for path in license_files:
            shutil.copyfile(path, temporary / path.name)
        (temporary / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        if out_dir.exists():
            os.replace(out_dir, previous)
        try:
            os.replace(temporary, out_dir)
        except OSError:
            if previous.exists():
                os.replace(previous, out_dir)
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)
