"""Command line: segment every CT in a folder with one loaded model.

    python -m app INPUT_DIR OUTPUT_DIR [--weights DIR] [--report FILE]
                  [--output-format {nii.gz,nii,mha,mhd,nrrd,same}] [--replace-1mm-spacing]

``--weights DIR``: a weights folder (default: weights/), for example one written by
``python -m app.import_weights`` from the published EfficientSCN models; its weights.json decides
the preprocessing.

Inputs (app/io.py says exactly which files are cases): the FLARE contract first, every
``NAME_0000.nii.gz`` in INPUT_DIR giving ``NAME.nii.gz`` in OUTPUT_DIR; in a folder without such
files, every ``.nii.gz``/``.nii``/``.mha``/``.mhd``/``.nrrd`` image and every subfolder holding
one DICOM series is a case, written as ``NAME.nii.gz`` (``--output-format same``: in the input's
own format; NIfTI for DICOM). Labels are uint8 on exactly the input's grid.

Each case prints one line: its result, or ``NAME: FAILED: FILE: reason`` on stderr, and the batch
goes on; warnings (``NAME: warning: FILE: ...``) leave a result. Exit status: 0 all cases
segmented, 1 some failed (summary ``N ok, M failed`` at the end), 2 nothing was done (no input
folder or no case in it, output folder not writable, weights missing or invalid).

A case that runs out of GPU memory is segmented again on the CPU, with a notice.
"""

import argparse
import json
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app import io as image_io
from app import method

IMAGE_SUFFIX = image_io.FLARE_SUFFIX  # FLARE naming, NAME_0000.nii.gz (also used by evaluation/)
OUT_OF_MEMORY_MARKERS = ("RESOURCE_EXHAUSTED", "OOM when allocating", "out of memory",
                         "CUDNN_STATUS_ALLOC_FAILED", "failed to allocate")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Segment liver (1), kidneys (2), spleen (3) and pancreas (4) in abdominal CT.")
    parser.add_argument("input_dir", type=Path,
                        help=f"folder of CT images: NAME{IMAGE_SUFFIX} (FLARE), or .nii.gz, .nii, "
                             ".mha, .mhd, .nrrd files and DICOM series folders")
    parser.add_argument("output_dir", type=Path, help="folder for the NAME.nii.gz label images")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with localization/segmentation weights (default: weights/)")
    parser.add_argument("--report", type=Path, default=None,
                        help="write one JSON object per case (JSON lines) to this file")
    parser.add_argument("--output-format", choices=image_io.OUTPUT_FORMATS,
                        default=image_io.DEFAULT_OUTPUT_FORMAT,
                        help="format of the label files (default nii.gz; 'same': the input's "
                             "format, nii.gz for DICOM)")
    assumed = "x".join(map(str, method.ASSUMED_SPACING_MM))
    parser.add_argument("--replace-1mm-spacing", action="store_true",
                        help="segment an image whose header spacing is exactly 1x1x1 mm as if it "
                             f"were {assumed} mm, as the published method did (the output keeps "
                             "the input's header)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def organ_volumes_ml(labels, slices_per_block=16):
    """Volume of each organ in mL from a uint8 label image.

    Counted a block of slices at a time: ``np.bincount`` works on an int64 copy of its input,
    8 bytes per voxel (1.3 GB for a 512x512x600 image at once).
    """
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(labels)
    counts = np.zeros(256, np.int64)  # every uint8 value: no pass over the volume to size it
    for first in range(0, array.shape[0], slices_per_block):
        counts += np.bincount(array[first:first + slices_per_block].ravel(), minlength=256)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {name: round(float(counts[label]) * voxel_ml, 2) for label, name in method.LABELS.items()}


def peak_memory_mb():
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def is_out_of_memory(error):
    """True for TensorFlow's (and XLA's/cuDNN's) out-of-memory errors."""
    import tensorflow as tf

    if isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    return (isinstance(error, (tf.errors.OpError, RuntimeError))
            and any(marker.lower() in str(error).lower() for marker in OUT_OF_MEMORY_MARKERS))


def predict_with_cpu_fallback(predictor, image, name):
    """``predictor.predict(image)``; on running out of (GPU) memory, once more on the CPU.

    Returns (CaseResult, device note or None). Prints a one-line notice when it falls back.
    """
    try:
        return predictor.predict(image), None
    except Exception as error:  # noqa: BLE001 - only memory errors are retried, others re-raised
        if not is_out_of_memory(error):
            raise
        first_line = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    print(f"{name}: out of GPU memory ({first_line}); segmenting this case on the CPU (slower)",
          file=sys.stderr)
    import tensorflow as tf

    with tf.device("/CPU:0"):
        return predictor.predict(image), "CPU (fallback after running out of GPU memory)"


def with_spacing(image, spacing_mm):
    """A copy of ``image`` with another spacing (origin and direction kept)."""
    import SimpleITK as sitk

    copy = sitk.Image(image)
    copy.SetSpacing(tuple(float(s) for s in spacing_mm))
    return copy


def partial_fov_note(image):
    """Which patient axes (x, y, z of LPS) an image covers too little for the localization
    network (app/localization.py's partial field-of-view rule), or []."""
    from app.localization import PARTIAL_FOV_EXTENT_MM

    # image axis i runs along the patient axis where column i of the direction matrix is largest
    matrix = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    extents = np.array(image.GetSize()) * np.array(image.GetSpacing())
    return sorted("xyz"[int(matrix[:, axis].argmax())] for axis in range(3)
                  if extents[axis] < PARTIAL_FOV_EXTENT_MM)


def run(input_dir, output_dir, weights_dir=None, report=None, progress=True,
        output_format=image_io.DEFAULT_OUTPUT_FORMAT, replace_1mm_spacing=False, predictor=None):
    """Segment every case of ``input_dir``; returns the per-case records (failed ones: 'error').

    ``predictor``: an already loaded ``Predictor`` (default: one loaded from ``weights_dir``).
    Raises FileNotFoundError / PermissionError / ValueError, before any work, when there is no
    case, the output folder is not writable, or the weights are missing or invalid.
    """
    cases = image_io.find_cases(input_dir)
    if not cases:
        raise FileNotFoundError(
            f"{input_dir}: no images named *{IMAGE_SUFFIX}, no other supported image "
            f"({', '.join('.' + f for f in image_io.FORMATS)}) and no DICOM series folder")
    image_io.check_writable(output_dir)
    start = time.perf_counter()
    if predictor is None:
        from app.predictor import DEFAULT_WEIGHTS_DIR, Predictor

        predictor = Predictor(weights_dir or DEFAULT_WEIGHTS_DIR)
        origins = origins_line(predictor.provenance)
        if origins:  # an imported folder may combine networks of two origins: say so
            print(f"weights {weights_dir or DEFAULT_WEIGHTS_DIR}: {origins}", file=sys.stderr)
    load_seconds = time.perf_counter() - start
    records = []
    report_file = open(report, "w") if report else None
    from tqdm import tqdm

    bar = tqdm(total=len(cases), unit="case", disable=not progress, file=sys.stderr)
    # the next image is read (and validated) while the current one is segmented
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(image_io.read_case, cases[0])
        for index, case in enumerate(cases):
            output_path = case.output_path(output_dir, output_format)
            record = {"case": case.name, "input": str(case.path), "format": case.format,
                      "output": str(output_path)}
            read_start = time.perf_counter()
            try:
                image, warnings = pending.result()
            except Exception as error:  # noqa: BLE001 - one bad case must not stop the rest
                image, warnings, record["error"] = None, [], str(error)
            if index + 1 < len(cases):
                pending = reader.submit(image_io.read_case, cases[index + 1])
            if warnings:
                record["warnings"] = warnings
                for warning in warnings:
                    bar.write(f"{case.name}: warning: {warning}", file=sys.stderr)
            if image is not None:
                try:
                    check_not_an_input(output_path, cases)
                    record.update(segment_one(predictor, image, output_path, read_start, case.name,
                                              replace_1mm_spacing))
                except Exception as error:  # noqa: BLE001
                    record["error"] = f"{case.path}: {error}"
            if index == 0:
                record["model_load_seconds"] = round(load_seconds, 3)
            records.append(record)
            bar.write(summary_line(record), file=sys.stderr if "error" in record else sys.stdout)
            bar.update(1)
            if report_file:
                report_file.write(json.dumps(record) + "\n")
                report_file.flush()
    bar.close()
    if report_file:
        report_file.close()
    return records


def check_not_an_input(output_path, cases):
    """Refuse to write over an input file (an output folder equal to the input folder)."""
    inputs = {case.path.resolve() for case in cases}
    for path in image_io.written_files(output_path):
        if path.resolve() in inputs:
            raise ValueError(f"writing {path} would overwrite an input: choose another output "
                             "folder")


def segment_one(predictor, image, output_path, read_start, name, replace_1mm_spacing=False):
    """Segment one image and write its labels; returns the report fields."""
    read_seconds = time.perf_counter() - read_start
    fields = {}
    source = image
    if replace_1mm_spacing and tuple(image.GetSpacing()) == method.SUSPICIOUS_SPACING_MM:
        source = with_spacing(image, method.ASSUMED_SPACING_MM)
        fields["segmented_with_spacing_mm_xyz"] = list(method.ASSUMED_SPACING_MM)
    partial = partial_fov_note(image)
    if partial:
        fields["partial_field_of_view_axes"] = partial
    result, device = predict_with_cpu_fallback(predictor, source, name)
    if device:
        fields["device"] = device
    labels = result.labels
    if source is not image:
        labels.CopyInformation(image)  # same voxels, the input's own header
    write_start = time.perf_counter()
    image_io.write_labels(labels, output_path)
    seconds = {"read": round(read_seconds, 3), **result.seconds,
               "write": round(time.perf_counter() - write_start, 3)}
    seconds["total"] = round(sum(seconds.values()), 3)
    return {
        "size_xyz": list(image.GetSize()),
        "spacing_mm_xyz": [round(s, 4) for s in image.GetSpacing()],
        **fields,
        "roi_index": result.roi_index,
        "roi_mm": result.roi_mm,
        "localization_spacing_mm": result.localization_spacing_mm,
        "segmentation_spacing_mm": result.segmentation_spacing_mm,
        "crop_size_xyz": list(result.crop_size),
        "seconds": seconds,
        "volumes_ml": organ_volumes_ml(labels),
        "peak_memory_mb": peak_memory_mb(),  # after everything the case allocates
    }


def origins_line(provenance):
    """Where each network's weights come from, when weights.json says (imported folders do)."""
    origins = {network: provenance.get(network, {}).get("origin")
               for network in ("localization", "segmentation")}
    if not any(origins.values()):
        return None
    return ", ".join(f"{network} = {origin or 'unrecorded'}" for network, origin in origins.items())


def summary_line(record):
    """The one line printed for a case."""
    if "error" in record:
        return f"{record['case']}: FAILED: {record['error']}"
    size = "x".join(map(str, record["size_xyz"]))
    roi = "x".join(map(str, record["roi_index"]["size_xyz"]))
    notes = ""
    if "partial_field_of_view_axes" in record:
        notes += f", partial field of view along {'/'.join(record['partial_field_of_view_axes'])}"
    if "device" in record:
        notes += f", on {record['device']}"
    return (f"{record['case']}: size {size}, ROI {roi} voxels "
            f"({'x'.join(f'{e:.0f}' for e in record['roi_mm']['extent_xyz'])} mm){notes}, "
            f"{record['seconds']['total']:.1f} s")


def main(argv=None, predictor=None):
    """The command; returns the exit status (0 ok, 1 some case failed, 2 nothing done).

    ``predictor``: an already loaded ``Predictor`` to use instead of loading --weights.
    """
    args = parse_args(argv)
    try:
        records = run(args.input_dir, args.output_dir, args.weights, args.report, not args.quiet,
                      args.output_format, args.replace_1mm_spacing, predictor)
    except (FileNotFoundError, PermissionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [r["case"] for r in records if "error" in r]
    warned = sum(1 for r in records if r.get("warnings") and "error" not in r)
    print(f"{len(records) - len(failed)} ok, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "")
          + (f"; {warned} with warnings" if warned else ""), file=sys.stderr)
    return 1 if failed else 0
