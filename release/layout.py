"""The weights-file layout of the Keras networks (app/weights_layout.json), derived from them.

    python -m release.layout            # does the file match app/networks.py? (exit 1 if not)
    python -m release.layout --write    # derive it from app/networks.py and write it

Keras names a variable in ``.weights.h5`` by its layer's position in the model; app/graphs.py reads
the files through this layout, so it must change whenever app/networks.py does.
"""

import argparse
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np

from app.graphs import LAYOUT_FILE
from app.networks import BUILDERS


def layout_of(model):
    """{place in the .weights.h5 file: [variable path, shape]} for a Keras model, found by
    writing each variable as its own index and reading the file back."""
    originals = [v.numpy() for v in model.weights]
    try:
        for index, variable in enumerate(model.weights):
            variable.assign(np.full(variable.shape, index, variable.dtype))
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "layout.weights.h5"
            model.save_weights(path)
            layout = {}
            with h5py.File(path, "r") as h5:
                def visit(name, item):
                    if isinstance(item, h5py.Dataset):
                        variable = model.weights[int(np.asarray(item).flat[0])]
                        layout[name] = [variable.path, list(variable.shape)]
                h5.visititems(visit)
    finally:
        for variable, value in zip(model.weights, originals):
            variable.assign(value)
    return dict(sorted(layout.items()))


def derived_layout():
    """{network: layout} of freshly built networks."""
    return {network: layout_of(build()) for network, build in BUILDERS.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m release.layout",
                                     description="Weights-file layout of the Keras networks.")
    parser.add_argument("--write", action="store_true",
                        help=f"derive the layout from app/networks.py and write {LAYOUT_FILE}")
    args = parser.parse_args(argv)
    layout = derived_layout()
    if args.write:
        LAYOUT_FILE.write_text(json.dumps(layout, indent=1) + "\n")
        print(f"wrote {LAYOUT_FILE}")
        return 0
    same = layout == json.loads(LAYOUT_FILE.read_text())
    print(f"{LAYOUT_FILE} {'matches' if same else 'DIFFERS FROM'} app/networks.py")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
