"""Average one network's weights over several weights folders of one lineage.

    python -m training.average_weights DIR DIR [DIR ...] --out DIR [--network segmentation]

Writes a complete weights folder: the chosen network's variables are the element-wise mean of the
folders' (the files must hold the same architecture; keras refuses others), the other network and
weights.json come from the first folder, and weights.json's entry for the averaged network records
the folders it was averaged from (and, when they are training snapshots, each one's run and
iteration, in place of the first folder's); the first folder's scores are dropped (they are not the
average's: ``python -m release.score_weights --weights DIR --update`` writes new ones). The
folder is written under a temporary name and renamed into place. Averaging only makes sense for
weights fine-tuned from one initialisation (snapshots or fine-tunings of one run), not for
independently trained models such as cross-validation folds.
"""

import argparse
from pathlib import Path

import numpy as np

from app import method
from app.networks import BUILDERS
from app.weights import WEIGHTS_FILES
from app.weights import DEFAULT_WEIGHTS_DIR, read_provenance
from release.weights_folder import write_folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="weights folders to average")
    parser.add_argument("--out", type=Path, required=True, help="the new weights folder")
    parser.add_argument("--network", choices=method.NETWORKS, default="segmentation")
    args = parser.parse_args(argv)
    if len(args.folders) < 2:
        parser.error("give at least two weights folders")
    if args.out.resolve() == DEFAULT_WEIGHTS_DIR.resolve() or args.out.exists():
        parser.error(f"{args.out}: exists; write the average to a new folder")
    return args


def averaged_model(folders, network):
    """A keras model of ``network`` holding the element-wise mean of the folders' weights."""
    model = BUILDERS[network]()
    total = None
    for folder in folders:
        model.load_weights(Path(folder) / WEIGHTS_FILES[network])
        values = [np.asarray(value, np.float64) for value in model.get_weights()]
        total = values if total is None else [a + b for a, b in zip(total, values)]
    model.set_weights([value / len(folders) for value in total])
    return model


def main(argv=None):
    args = parse_args(argv)
    provenance = read_provenance(args.folders[0])
    provenance.pop("scores", None)
    entry = provenance.get(args.network)
    entry = dict(entry) if isinstance(entry, dict) else {}
    entry["averaged_from"] = [str(folder) for folder in args.folders]
    # The first folder's snapshot record is not the average's; the snapshots averaged are.
    entry.pop("snapshot", None)
    snapshots = [(read_provenance(folder).get(args.network) or {}).get("snapshot")
                 for folder in args.folders]
    if all(snapshots):
        entry["averaged_snapshots"] = snapshots
    provenance[args.network] = entry
    model = averaged_model(args.folders, args.network)
    write_folder(args.out, {args.network: model}, provenance, args.folders[0], [])
    print(f"wrote the mean of {len(args.folders)} {args.network} weight sets to {args.out}")


if __name__ == "__main__":
    main()
