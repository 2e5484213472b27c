"""Import the published EfficientSCN weights (TF2 SavedModels) into this project's networks.

    python -m release.import_weights SAVED_MODELS_DIR --out DIR [--only NETWORK] [--fill-from DIR]

SAVED_MODELS_DIR holds the authors' ``localization/`` and/or ``segmentation/`` SavedModel folders
(``submitted_saved_models`` of github franzthaler/FLARE21-EfficientSCN, GPL-3.0). Only their
variables are read (``<folder>/variables/variables``): every published variable is matched by name
to one of ours (``published_layout``), its shape checked, the totals checked (637,474 and
1,270,090), and the values written as ``localization.weights.h5`` / ``segmentation.weights.h5``
with a ``weights.json`` that records the source, the license and the preprocessing of the
published inference (area downsampling without smoothing for stage 1, crop padding 0 HU for
stage 2; METHOD.md), which the ``Predictor`` then applies.

A folder always holds both networks, so that the predictor can use it: a network not imported is
copied from ``--fill-from`` (default: this project's ``weights/``), announced on the terminal and
recorded in weights.json with its own origin, license and preprocessing.

License: the published models are GPL-3.0 and are not shipped with this project. The folder this
writes holds their converted variables, stays under GPL-3.0 (their ``LICENSE*`` files are copied
into it) and is not covered by this project's Apache-2.0 license (NOTICE).
"""

import argparse
import sys
from datetime import date
from pathlib import Path

import numpy as np
import tensorflow as tf

from app import method
from app.networks import BUILDERS
from app.weights import (DEFAULT_WEIGHTS_DIR, NETWORK_SETTINGS, PUBLISHED, WEIGHTS_FILES,
                         read_provenance, read_settings)
from release.weights_folder import write_folder

PARAMETERS = {"localization": method.LOCALIZATION_PARAMETERS, "segmentation": method.SCN_PARAMETERS}
VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"  # how a TF2 object checkpoint names a variable's value
PUBLISHED_ORIGIN = "published EfficientSCN SavedModel"
PUBLISHED_LICENSE = "GPL-3.0 (published EfficientSCN models)"
REFERENCE = ("Thaler et al., Efficient Multi-Organ Segmentation Using SpatialConfiguration-Net "
             "with Low GPU Memory Requirements, FLARE 2021; "
             "github franzthaler/FLARE21-EfficientSCN")
# METHOD.md, "Reported results": hidden FLARE21 validation set (50 cases), DSC / NSD@1mm in %.
PAPER_SCORES = {"liver": [95.43, 80.03], "kidney": [89.74, 77.76], "spleen": [93.88, 86.57],
                "pancreas": [75.15, 60.00]}
# METHOD.md, SCN: the five spatial configuration nets in creation order.
SPATIAL_NET_ORDER = (*(method.LABELS[k] for k in sorted(method.LABELS)), "background")


def unet_paths(name, levels):
    """Our variable paths of one U-Net in the published creation order.

    Contracting blocks of levels 0..L-1, then expanding blocks 0..L-1 (METHOD.md, "Networks");
    each block has two convolutions, each a kernel then a bias.
    """
    return [f"{name}_{stage}_{level}/conv_{conv}/{kind}"
            for stage in ("contracting", "expanding") for level in range(levels)
            for conv in range(2) for kind in ("kernel", "bias")]


def conv_paths(name):
    return [f"{name}/kernel", f"{name}/bias"]


def published_layout(network):
    """(published variable name, our variable path) for every variable of ``network``.

    Published names (METHOD.md, "Published weights"): localization ``model/variables/0..41``;
    segmentation ``local_appearance/variables/0..39``, ``local_appearance/prediction/{kernel,bias}``
    and ``spatial_configuration/variables/0..169`` (five nets of 34: liver, kidney, spleen,
    pancreas, background).
    """
    if network == "localization":
        ours = (unet_paths("localization", method.LOCALIZATION_LEVELS)
                + conv_paths("localization_prediction"))
        return [(f"model/variables/{i}", path) for i, path in enumerate(ours)]
    if network != "segmentation":
        raise ValueError(f"unknown network {network!r}: one of {', '.join(method.NETWORKS)}")
    local = unet_paths("local_appearance", method.LOCAL_APPEARANCE_LEVELS)
    spatial = []
    for name in SPATIAL_NET_ORDER:
        spatial += (unet_paths(f"spatial_{name}", method.SPATIAL_LEVELS)
                    + conv_paths(f"spatial_{name}_prediction"))
    return ([(f"local_appearance/variables/{i}", path) for i, path in enumerate(local)]
            + [(f"local_appearance/prediction/{kind}", f"local_appearance_prediction/{kind}")
               for kind in ("kernel", "bias")]
            + [(f"spatial_configuration/variables/{i}", path) for i, path in enumerate(spatial)])


def checkpoint_prefix(saved_model):
    """The variables checkpoint of a SavedModel folder; FileNotFoundError if it is incomplete."""
    prefix = Path(saved_model) / "variables" / "variables"
    index = prefix.with_name("variables.index")
    if not index.is_file():
        raise FileNotFoundError(f"{index}: missing; expected a TF2 SavedModel folder "
                                "(saved_model.pb and variables/)")
    if not list(prefix.parent.glob("variables.data-*")):
        raise FileNotFoundError(f"{prefix.parent}: the values file (variables.data-*) is missing, "
                                "only the index is there; download the complete published model")
    return prefix


def open_checkpoint(prefix):
    """A ``tf.train.CheckpointReader``; ValueError naming the checkpoint if it cannot be read."""
    try:
        return tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError) as error:
        raise ValueError(f"{prefix}: cannot be read as a TensorFlow checkpoint ({error})") from None


def checkpoint_shapes(reader):
    """{published variable name: shape} of a checkpoint (keys without VALUE_SUFFIX).

    Keys that are not variable values (the object graph, optimizer slots) are left out.
    """
    return {name[: -len(VALUE_SUFFIX)]: tuple(shape)
            for name, shape in reader.get_variable_to_shape_map().items()
            if name.endswith(VALUE_SUFFIX)}


def check_variables(prefix, network, found, model):
    """Raise ValueError unless the checkpoint's variables are exactly the published layout.

    Checks names (none missing, none extra), every shape against our variable, and the totals.
    """
    layout = published_layout(network)
    expected = {name for name, _ in layout}
    missing, extra = sorted(expected - set(found)), sorted(set(found) - expected)
    if missing or extra:
        raise ValueError(f"{prefix}: not the published {network} model: "
                         f"missing variables {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected variables {extra[:5]}{'...' if len(extra) > 5 else ''}")
    ours = {variable.path: variable for variable in model.weights}
    if set(ours) != {path for _, path in layout}:
        raise ValueError(f"our {network} network's variables do not match the published layout")
    for name, path in layout:
        if tuple(ours[path].shape) != found[name]:
            raise ValueError(f"{prefix}: variable {name} (our {path}): expected shape "
                             f"{tuple(ours[path].shape)}, found {found[name]}")
    total = sum(int(np.prod(found[name])) for name in expected)
    if not total == model.count_params() == PARAMETERS[network]:
        raise ValueError(f"{prefix}: {total} values, expected {PARAMETERS[network]} for the "
                         f"{network} network (ours has {model.count_params()})")


def load_published(network, saved_model):
    """Our ``network`` (Keras model) holding the published values, and its provenance record."""
    prefix = checkpoint_prefix(saved_model)
    reader = open_checkpoint(prefix)
    model = BUILDERS[network]()
    check_variables(prefix, network, checkpoint_shapes(reader), model)
    ours = {variable.path: variable for variable in model.weights}
    for name, path in published_layout(network):
        value = reader.get_tensor(name + VALUE_SUFFIX)
        if not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
            raise ValueError(f"{prefix}: variable {name} holds {value.dtype} values that are not "
                             "all finite floating point numbers")
        # channels_first there, channels_last here: the kernels carry over unchanged (METHOD.md)
        ours[path].assign(value.astype(np.float32))
    record = {"origin": PUBLISHED_ORIGIN, "source": str(Path(saved_model).resolve()),
              "license": PUBLISHED_LICENSE, "variables": len(published_layout(network)),
              "parameters": PARAMETERS[network],
              "preprocessing": {key: getattr(PUBLISHED, key) for key in NETWORK_SETTINGS[network]}}
    if network == "segmentation":
        record["paper_scores_dsc_nsd_percent"] = PAPER_SCORES
    return model, record


def filled_record(network, fill_from):
    """Provenance of a network copied from another weights folder: origin, license, settings."""
    provenance = read_provenance(fill_from)
    own = provenance.get(network, {})
    settings = read_settings(fill_from)
    return {"origin": own.get("origin", f"copied from {Path(fill_from).resolve()}"),
            "source": str((Path(fill_from) / WEIGHTS_FILES[network]).resolve()),
            "license": own.get("license", provenance.get("license", "unknown")),
            "preprocessing": {key: getattr(settings, key) for key in NETWORK_SETTINGS[network]}}


def networks_to_import(saved_models_dir, only):
    """The networks to read: ``only`` or every one whose folder is present."""
    if not Path(saved_models_dir).is_dir():
        raise FileNotFoundError(f"{saved_models_dir}: folder does not exist")
    networks = [only] if only else [n for n in method.NETWORKS
                                    if (Path(saved_models_dir) / n).is_dir()]
    if not networks:
        raise FileNotFoundError(f"{saved_models_dir}: holds neither localization/ nor "
                                "segmentation/ (the published submitted_saved_models folder does)")
    return networks


def check_output(out_dir, overwrite):
    """Refuse to replace the project's own weights, or an existing folder without ``overwrite``."""
    if Path(out_dir).resolve() == DEFAULT_WEIGHTS_DIR.resolve():
        raise ValueError(f"{out_dir}: is the project's own weights folder; import elsewhere "
                         "(the published weights must not be redistributed with the project)")
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists; choose another folder or --overwrite")


def import_weights(saved_models_dir, out_dir, only=None, fill_from=DEFAULT_WEIGHTS_DIR,
                   overwrite=False):
    """Import the published networks into a weights folder for ``Predictor``.

    Returns the folder's weights.json as a dict.

    ``only``: "localization" or "segmentation" (default: every network folder present). The
    other network is copied from ``fill_from``. Raises FileNotFoundError, FileExistsError or
    ValueError with the file and the reason; nothing is written then.
    """
    saved_models_dir = Path(saved_models_dir)
    check_output(out_dir, overwrite)
    networks = networks_to_import(saved_models_dir, only)
    models, records = {}, {}
    for network in networks:
        try:
            models[network], records[network] = load_published(network, saved_models_dir / network)
        except FileNotFoundError as error:
            if only or len(networks) == 1:
                raise
            other = next(n for n in networks if n != network)
            raise FileNotFoundError(f"{error} (to import the {other} network alone: "
                                    f"--only {other})") from None
    for network in method.NETWORKS:
        if network not in records:
            if not (Path(fill_from) / WEIGHTS_FILES[network]).is_file():
                raise FileNotFoundError(f"{Path(fill_from) / WEIGHTS_FILES[network]}: missing; "
                                        f"needed for the {network} network, not imported")
            records[network] = filled_record(network, fill_from)
    license_files = sorted(p for p in saved_models_dir.glob("LICENSE*") if p.is_file())
    provenance = {
        "date": date.today().isoformat(),
        "imported_with": "python -m release.import_weights",
        "source": str(saved_models_dir.resolve()),
        "license": PUBLISHED_LICENSE,
        "license_files": [p.name for p in license_files],
        "reference": REFERENCE,
        "imported_networks": networks,
        "mixed_origins": len({r["origin"] for r in records.values()}) > 1,
        "preprocessing": {key: value for network in method.NETWORKS
                          for key, value in records[network]["preprocessing"].items()},
        **records,
    }
    write_folder(out_dir, models, provenance, fill_from, license_files)
    return provenance


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m release.import_weights",
        description="Import the published EfficientSCN SavedModels (GPL-3.0) as a weights folder "
                    "for predict.sh --weights.")
    parser.add_argument("saved_models_dir", type=Path,
                        help="folder with the published localization/ and/or segmentation/")
    parser.add_argument("--out", type=Path, required=True, help="weights folder to write")
    parser.add_argument("--only", choices=method.NETWORKS, default=None,
                        help="import one network (default: every network folder present)")
    parser.add_argument("--fill-from", type=Path, default=DEFAULT_WEIGHTS_DIR,
                        help="weights folder for a network not imported (default: weights/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        provenance = import_weights(args.saved_models_dir, args.out, args.only, args.fill_from,
                                    args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for network in method.NETWORKS:
        record = provenance[network]
        print(f"{network}: {record['origin']}; license: {record['license']}; "
              f"from {record['source']}")
    if provenance["mixed_origins"]:
        print("note: the two networks come from different sources (see weights.json)",
              file=sys.stderr)
    print(f"wrote {args.out} (use: ./predict.sh IN OUT --weights {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
