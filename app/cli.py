"""Command line: segment every CT in a folder (the FLARE contract) with one loaded model.

    python -m app INPUT_DIR OUTPUT_DIR [--weights DIR] [--report FILE]

``--weights DIR``: a weights folder (default: weights/), for example one written by
``python -m app.import_weights`` from the published EfficientSCN models; its weights.json decides
the preprocessing.

Reads every ``NAME_0000.nii.gz`` in INPUT_DIR and writes ``NAME.nii.gz`` (uint8 labels on the
input's grid) into OUTPUT_DIR. One failing case is reported and the others go on; the exit status
is 1 if any case failed.
"""

import argparse
import gzip
import json
import os
import resource
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app import method

IMAGE_SUFFIX = "_0000.nii.gz"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Segment liver (1), kidneys (2), spleen (3) and pancreas (4) in abdominal CT.")
    parser.add_argument("input_dir", type=Path, help=f"folder of CT images named NAME{IMAGE_SUFFIX}")
    parser.add_argument("output_dir", type=Path, help="folder for the NAME.nii.gz label images")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with localization/segmentation weights (default: weights/)")
    parser.add_argument("--report", type=Path, default=None,
                        help="write one JSON object per case (JSON lines) to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def find_inputs(input_dir):
    """(case name, path) of every FLARE-named image in ``input_dir``, sorted by name."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder does not exist")
    paths = sorted(input_dir.glob(f"*{IMAGE_SUFFIX}"))
    return [(path.name[: -len(IMAGE_SUFFIX)], path) for path in paths]


def check_writable(output_dir):
    """Create the output folder and prove it writable before any work is done."""
    output_dir.mkdir(parents=True, exist_ok=True)
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as error:
        raise PermissionError(f"{output_dir}: output folder is not writable ({error})") from None
    probe.unlink()


def check_gzip_stream(path, chunk_bytes=1 << 24):
    """Raise ValueError if a gzip file is truncated or corrupt.

    ITK's NIfTI reader accepts a truncated .nii.gz and fills the missing voxels, so the stream is
    decompressed once here (in the reader thread, overlapping the previous case) to prove it whole.
    """
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(chunk_bytes):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: truncated or corrupt gzip data ({error})") from None


def read_image(path):
    """Read a CT image with SimpleITK; errors name the file."""
    import SimpleITK as sitk

    if str(path).endswith(".gz"):
        check_gzip_stream(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(f"{path}: cannot be read as an image ({str(error).strip()[:200]})") from None
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: expected a 3-D image, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected one value per voxel, got "
                         f"{image.GetNumberOfComponentsPerPixel()}")
    return image


def write_labels(labels, path):
    """Write a label image atomically: a hidden temporary name in the same folder, then rename."""
    import SimpleITK as sitk

    temporary = path.with_name(f".{path.name[:-len('.nii.gz')]}.partial-{os.getpid()}.nii.gz")
    try:
        sitk.WriteImage(labels, str(temporary), useCompression=True)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def organ_volumes_ml(labels):
    """Volume of each organ in mL from a label image."""
    import SimpleITK as sitk

    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=method.NUM_CLASSES)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {name: round(float(counts[label]) * voxel_ml, 2) for label, name in method.LABELS.items()}


def peak_memory_mb():
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def run(input_dir, output_dir, weights_dir=None, report=None, progress=True):
    """Segment every case; returns the list of per-case records (failed ones carry 'error')."""
    cases = find_inputs(input_dir)
    if not cases:
        raise FileNotFoundError(f"{input_dir}: no images named *{IMAGE_SUFFIX}")
    check_writable(output_dir)
    start = time.perf_counter()
    from app.predictor import DEFAULT_WEIGHTS_DIR, Predictor

    predictor = Predictor(weights_dir or DEFAULT_WEIGHTS_DIR)
    load_seconds = time.perf_counter() - start
    origins = origins_line(predictor.provenance)
    if origins:  # an imported folder may combine networks of two origins: say so
        print(f"weights {weights_dir or DEFAULT_WEIGHTS_DIR}: {origins}", file=sys.stderr)
    records = []
    report_file = open(report, "w") if report else None
    from tqdm import tqdm

    bar = tqdm(total=len(cases), unit="case", disable=not progress, file=sys.stderr)
    # the next image is read while the current one is segmented
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read_image, cases[0][1])
        for index, (name, path) in enumerate(cases):
            output_path = output_dir / f"{name}.nii.gz"
            record = {"case": name, "input": str(path), "output": str(output_path)}
            read_start = time.perf_counter()
            try:
                image = pending.result()
            except Exception as error:  # noqa: BLE001 - one bad case must not stop the rest
                image, record["error"] = None, str(error)
            if index + 1 < len(cases):
                pending = reader.submit(read_image, cases[index + 1][1])
            if image is not None:
                try:
                    record.update(segment_one(predictor, image, output_path, read_start))
                except Exception as error:  # noqa: BLE001
                    record["error"] = f"{path}: {error}"
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


def segment_one(predictor, image, output_path, read_start):
    """Segment one image and write its labels; returns the report fields."""
    read_seconds = time.perf_counter() - read_start
    result = predictor.predict(image)
    write_start = time.perf_counter()
    write_labels(result.labels, output_path)
    seconds = {"read": round(read_seconds, 3), **result.seconds,
               "write": round(time.perf_counter() - write_start, 3)}
    seconds["total"] = round(sum(seconds.values()), 3)
    return {
        "size_xyz": list(image.GetSize()),
        "spacing_mm_xyz": [round(s, 4) for s in image.GetSpacing()],
        "roi_index": result.roi_index,
        "roi_mm": result.roi_mm,
        "localization_spacing_mm": result.localization_spacing_mm,
        "segmentation_spacing_mm": result.segmentation_spacing_mm,
        "crop_size_xyz": list(result.crop_size),
        "seconds": seconds,
        "peak_memory_mb": peak_memory_mb(),
        "volumes_ml": organ_volumes_ml(result.labels),
    }


def origins_line(provenance):
    """Where each network's weights come from, when weights.json says (imported folders do)."""
    origins = {network: provenance.get(network, {}).get("origin")
               for network in ("localization", "segmentation")}
    if not any(origins.values()):
        return None
    return ", ".join(f"{network} = {origin or 'unrecorded'}" for network, origin in origins.items())


def summary_line(record):
    if "error" in record:
        return f"{record['case']}: FAILED: {record['error']}"
    size = "x".join(map(str, record["size_xyz"]))
    roi = "x".join(map(str, record["roi_index"]["size_xyz"]))
    return (f"{record['case']}: size {size}, ROI {roi} voxels "
            f"({'x'.join(f'{e:.0f}' for e in record['roi_mm']['extent_xyz'])} mm), "
            f"{record['seconds']['total']:.1f} s")


def main(argv=None):
    args = parse_args(argv)
    try:
        records = run(args.input_dir, args.output_dir, args.weights, args.report, not args.quiet)
    except (FileNotFoundError, PermissionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [r["case"] for r in records if "error" in r]
    print(f"{len(records) - len(failed)} of {len(records)} cases segmented"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
