"""Command line: segment every CT in a folder with one loaded model.

    python -m app INPUT_DIR OUTPUT_DIR [--weights DIR] [--report FILE]
                  [--output-format {nii.gz,nii,mha,mhd,nrrd,same,dicom-seg}]
                  [--replace-1mm-spacing]
                  [--skip-existing] [--overwrite] [--max-gib GIB] [--verbose] [--quiet]

``--weights DIR``: a weights folder (default: weights/), for example one written by
``python -m release.import_weights`` from the published EfficientSCN models; its weights.json
decides the preprocessing.

Inputs (app/io.py says exactly which files are cases): every ``.nii.gz``/``.nii``/``.mha``/
``.mhd``/``.nrrd`` image and every subfolder holding one DICOM series in INPUT_DIR is a case,
named by the FLARE rule where it follows it (``NAME_0000.nii.gz`` gives ``NAME.nii.gz`` in
OUTPUT_DIR), written as ``NAME.nii.gz`` (``--output-format same``: in the input's own format;
NIfTI for DICOM; ``--output-format dicom-seg``: ``NAME.dcm``, one DICOM Segmentation object
referencing the series' slices, app/dicom_seg.py; a case that is no DICOM series then fails with
that reason, since a SEG needs source slices to refer to). Labels are uint8 on exactly the
input's grid. Every other entry of INPUT_DIR is listed once, with the reason, as
``skipped: PATH: reason``.

Each case prints one line: its result, or ``NAME: FAILED: FILE: reason`` on stderr, and the batch
goes on; warnings (``NAME: warning: FILE: ...``) leave a result. Exit status: 0 all cases
segmented, 1 some failed or the report could not be written (summary ``N ok, M failed`` at the
end), 2 nothing was done (no input folder or no case in it, output folder not writable, an output
or report path that is an input, weights missing or invalid, or every case failed), 130 when
interrupted (Ctrl-C).

Outputs are verified (read back and compared) before they are renamed into place. A case that
runs out of GPU memory is segmented again on the CPU, with a notice; running out of the
machine's memory fails the case (``--max-gib`` refuses such cases before reading them).
"""

import argparse
import json
import os
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
                             "format, nii.gz for DICOM; 'dicom-seg': NAME.dcm, a DICOM "
                             "Segmentation of a DICOM series input, other inputs fail)")
    assumed = "x".join(map(str, method.ASSUMED_SPACING_MM))
    parser.add_argument("--replace-1mm-spacing", action="store_true",
                        help="segment an image whose header spacing is exactly 1x1x1 mm as if it "
                             f"were {assumed} mm, as the published method did (the output keeps "
                             "the input's header)")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep the output of a case that already has one which reads whole "
                             "and lies on the input's grid (to resume an interrupted batch)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow an output to replace a file of the input folder that is not "
                             "an input, such as a FLARE label NAME.nii.gz beside NAME_0000.nii.gz "
                             "(inputs themselves are never overwritten)")
    parser.add_argument("--max-gib", type=positive_float, default=None,
                        help="refuse, before reading its voxels, a case whose estimated memory "
                             "(the image plus 18 bytes per voxel) exceeds this many GiB "
                             "(default: this machine's memory, or the container's limit)")
    parser.add_argument("--min-island-fraction", type=unit_interval, default=None, metavar="F",
                        help="after the argmax, relabel as background each organ's connected "
                             "pieces smaller than F of its largest piece, except pieces that "
                             f"touch the image's edge (default {method.MIN_ISLAND_FRACTION:g}; "
                             "0: the paper's plain argmax; weights/MODEL_CARD.md, rule "
                             "R-islands2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true",
                        help="also show the messages of TensorFlow, ITK and the NIfTI library "
                             "(hidden by default: each problem is said once in our words)")
    return parser.parse_args(argv)


def unit_interval(text):
    """argparse type: a number from 0 to 1 (a fraction, a probability)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


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
    return {name: round(float(counts[label]) * voxel_ml, 2)
            for label, name in method.LABELS.items()}


def peak_memory_mb():
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def is_out_of_memory(error):
    """True for TensorFlow's (and XLA's/cuDNN's) out-of-memory errors.

    Not for the host running out of memory: Python's MemoryError, or SimpleITK's "Failed to
    allocate memory for image" (a RuntimeError), which a retry on the CPU cannot help.
    """
    import tensorflow as tf

    if isinstance(error, tf.errors.ResourceExhaustedError):
        return True
    if isinstance(error, RuntimeError) and not isinstance(error, tf.errors.OpError) and (
            "SimpleITK" in str(error) or "itk::" in str(error) or ".hxx:" in str(error)):
        return False
    return (isinstance(error, (tf.errors.OpError, RuntimeError))
            and any(marker.lower() in str(error).lower() for marker in OUT_OF_MEMORY_MARKERS))


def describe_error(error):
    """One line for a failed case's exception."""
    if isinstance(error, MemoryError) or (
            isinstance(error, RuntimeError) and "Failed to allocate memory" in str(error)):
        return ("out of memory (the machine's, not the GPU's): the image is too large for this "
                "machine; --max-gib refuses such images before reading them")
    text = str(error).strip() or type(error).__name__
    first = text.splitlines()[0] if "SimpleITK" not in text else \
        image_io.reader_message(error)
    return first[:500]


def predict_with_cpu_fallback(predictor, image, name):
    """``predictor.predict(image)``; on running out of (GPU) memory, once more on the CPU.

    Returns (CaseResult, device note or None). Prints a one-line notice when it falls back.
    """
    try:
        return predictor.predict(image), None
    except Exception as error:  # only memory errors are retried, others re-raised
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
    # image axis i runs along the patient axis where column i of the direction matrix is largest
    matrix = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    extents = np.array(image.GetSize()) * np.array(image.GetSpacing())
    return sorted("xyz"[int(matrix[:, axis].argmax())] for axis in range(3)
                  if extents[axis] < method.PARTIAL_FOV_EXTENT_MM)


class Report:
    """The --report JSON lines, rewritten whole after each case under a temporary name of this
    process and renamed into place: a reader (or a second run writing the same report) never
    sees a partial line, and a failing disk loses the update, not the file. A write that fails
    is said once; the batch goes on."""

    def __init__(self, path):
        self.path = Path(path) if path else None
        self.lines, self.error = [], None

    def add(self, record):
        if self.path is None:
            return
        self.lines.append(json.dumps(record) + "\n")
        temporary = self.path.parent / f"{image_io.partial_name()}.jsonl"
        try:
            with open(temporary, "w", encoding="utf-8") as stream:
                stream.write("".join(self.lines))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            if self.error is None:
                self.error = f"--report {self.path}: cannot be written ({error.strerror or error})"
                print(f"error: {self.error}; the batch goes on, the report stays incomplete",
                      file=sys.stderr)


def check_paths(cases, skipped, output_dir, output_format, report, overwrite):
    """Before any work: refuse (ValueError) an output folder or report that is, or lies inside,
    an input, and a report that is an output or a file of the input folder; returns the cases
    with a ``problem`` where their output would replace an input, or (without ``overwrite``) a
    file of the input folder that is not an input (a FLARE label NAME.nii.gz)."""
    import dataclasses

    inputs = {}
    for case in cases:
        inputs[case.path.resolve()] = case.path
        if case.format == "mhd":
            for suffix in image_io.MHD_DATA_SUFFIXES:
                inputs[case.path.with_suffix(suffix).resolve()] = case.path
    folders = [case.path.resolve() for case in cases if case.format == image_io.DICOM]
    others = {item.path.resolve(): item for item in skipped if not item.path.is_symlink()}

    def inside_input(path):
        path = Path(path).resolve()
        owner = inputs.get(path) or next((f for f in folders if path.is_relative_to(f)), None)
        return owner

    owner = inside_input(output_dir)
    if owner is not None:
        raise ValueError(f"{output_dir}: the output folder is (or lies inside) the input {owner}: "
                         "choose another output folder")
    outputs = {}
    checked = []
    for case in cases:
        output_path = case.output_path(output_dir, output_format)
        problem = case.problem or seg_input_problem(case, output_format)
        for path in image_io.written_files(output_path):
            resolved = path.resolve()
            outputs[resolved] = path
            if problem:
                break
            if resolved in inputs:
                problem = (f"{case.path}: writing {path} would overwrite the input "
                           f"{inputs[resolved]}: choose another output folder")
            elif resolved in others and not overwrite:
                problem = (f"{case.path}: writing {path} would replace a file of the input folder "
                           f"({others[resolved].reason}); --overwrite allows it, or choose "
                           "another output folder")
        checked.append(dataclasses.replace(case, problem=problem))
    if report is not None:
        report = Path(report)
        owner = inside_input(report)
        if owner is not None:
            raise ValueError(f"--report {report}: is (or lies inside) the input {owner}: writing "
                             "the report would destroy it")
        if report.resolve() in outputs:
            raise ValueError(f"--report {report}: is an output image path")
        if report.resolve() in others:
            raise ValueError(f"--report {report}: is a file of the input folder "
                             f"({others[report.resolve()].reason}): writing the report would "
                             "destroy it")
        if report.is_dir():
            raise ValueError(f"--report {report}: is a folder")
    return checked


def run(input_dir, output_dir, weights_dir=None, report=None, progress=True,
        output_format=image_io.DEFAULT_OUTPUT_FORMAT, replace_1mm_spacing=False, predictor=None,
        skip_existing=False, overwrite=False, max_gib=None, min_island_fraction=None):
    """Segment every case of ``input_dir``; returns (per-case records (failed ones: 'error'),
    the report's error or None).

    ``predictor``: an already loaded ``Predictor`` (default: one loaded from ``weights_dir``,
    with ``min_island_fraction`` when given; an already loaded one must have that fraction).
    Raises FileNotFoundError / NotADirectoryError / PermissionError / ValueError, before any
    work, when there is no case, the output folder is not writable, an output or the report
    would replace an input, or the weights are missing or invalid.
    """
    if (predictor is not None and min_island_fraction is not None
            and getattr(predictor, "min_island_fraction", None) != min_island_fraction):
        raise ValueError(f"min_island_fraction {min_island_fraction}: the predictor given was "
                         f"loaded with {getattr(predictor, 'min_island_fraction', None)}")
    cases, skipped = image_io.survey(input_dir)
    for item in skipped:
        print(f"skipped: {item.path}: {item.reason}", file=sys.stderr)
    if not cases:
        raise FileNotFoundError(image_io.nothing_to_segment(input_dir, skipped))
    cases = check_paths(cases, skipped, output_dir, output_format, report, overwrite)
    image_io.check_writable(output_dir)
    folders = {Path(output_dir).resolve()} | ({Path(report).resolve().parent} if report else set())
    for folder in sorted(folders):
        removed = image_io.remove_stale_partials(folder)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of an interrupted run from {folder}",
                  file=sys.stderr)
    max_bytes = (round(max_gib * 2**30) if max_gib is not None
                 else image_io.default_max_bytes())
    records, report_file = [], Report(report)
    todo = []
    for case in cases:
        output_path = case.output_path(output_dir, output_format)
        if skip_existing and not case.problem:
            problem = existing_output_problem(case, output_path)
            if problem is None:
                record = {"case": case.name, "input": str(case.path), "format": case.format,
                          "output": str(output_path), "skipped": "output exists and verifies"}
                records.append(record)
                print(summary_line(record))
                report_file.add(record)
                continue
            if (Path(output_path)).exists():
                print(f"{case.name}: existing output {output_path} is {problem}: segmented again",
                      file=sys.stderr)
        todo.append(case)
    if not todo:
        return records, report_file.error
    if all(case.problem for case in todo):
        predictor = predictor or NO_PREDICTOR  # nothing to segment: no model to load
    start = time.perf_counter()
    if predictor is None:
        from app.predictor import Predictor
        from app.weights import DEFAULT_WEIGHTS_DIR

        predictor = Predictor(weights_dir or DEFAULT_WEIGHTS_DIR,
                              **({} if min_island_fraction is None
                                 else {"min_island_fraction": min_island_fraction}))
        origins = origins_line(predictor.provenance)
        if origins:  # an imported folder may combine networks of two origins: say so
            print(f"weights {weights_dir or DEFAULT_WEIGHTS_DIR}: {origins}", file=sys.stderr)
    load_seconds = time.perf_counter() - start
    from tqdm import tqdm

    def read(case):
        return image_io.read_case(case, replace_1mm_spacing=replace_1mm_spacing,
                                  max_bytes=max_bytes)

    bar = tqdm(total=len(todo), unit="case", disable=not progress, file=sys.stderr)
    # the next image is read (and validated) while the current one is segmented
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(read, todo[0])
        for index, case in enumerate(todo):
            output_path = case.output_path(output_dir, output_format)
            record = {"case": case.name, "input": str(case.path), "format": case.format,
                      "output": str(output_path)}
            read_start = time.perf_counter()
            try:
                image, warnings = pending.result()
            except Exception as error:  # one bad case must not stop the rest
                image, warnings, record["error"] = None, [], with_path(case, error)
            if index + 1 < len(todo):
                pending = reader.submit(read, todo[index + 1])
            if warnings:
                record["warnings"] = warnings
                for warning in warnings:
                    bar.write(f"{case.name}: warning: {warning}", file=sys.stderr)
            if image is not None:
                try:
                    record.update(segment_one(predictor, image, output_path, read_start, case.name,
                                              replace_1mm_spacing, case))
                except Exception as error:
                    record["error"] = with_path(case, error)
            if index == 0:
                record["model_load_seconds"] = round(load_seconds, 3)
            records.append(record)
            bar.write(summary_line(record), file=sys.stderr if "error" in record else sys.stdout)
            bar.update(1)
            report_file.add(record)
    bar.close()
    return records, report_file.error


NO_PREDICTOR = object()  # stands for the model when every case is refused before reading


def with_path(case, error):
    """The error line of a case: the reason, after the input's path unless it names it."""
    text = describe_error(error)
    return text if text.startswith(str(case.path)) else f"{case.path}: {text}"


def seg_input_problem(case, output_format):
    """Why ``case`` cannot have a DICOM SEG output, or None."""
    if output_format != image_io.DICOM_SEG or case.format == image_io.DICOM:
        return None
    return (f"{case.path}: --output-format dicom-seg needs a DICOM series input (a DICOM SEG "
            f"refers to the source slices); this is a {case.format} file: use --output-format "
            "nii.gz for it")


def existing_output_problem(case, output_path):
    """``image_io.existing_output_problem``, and for a DICOM SEG output its own check."""
    if Path(output_path).suffix != ".dcm":
        return image_io.existing_output_problem(case, output_path)
    from app import dicom_seg

    try:
        with image_io.quiet_itk():
            image, _ = image_io.read_dicom_series(case.path)
    except image_io.InputError as error:
        return f"the input cannot be read ({error})"
    return dicom_seg.existing_seg_problem(output_path, image_io.dicom_series_files(case.path),
                                          image)


def write_output(labels, output_path, case, predictor, source_files=None):
    """Write ``labels`` to ``output_path`` in the format its name says, atomically and verified;
    a ``.dcm`` path is a DICOM SEG over ``case``'s series (``source_files``, default the one
    series of its folder). Returns notes (may be empty)."""
    if Path(output_path).suffix != ".dcm":
        image_io.write_labels(labels, output_path)
        return []
    from app import dicom_seg

    files = source_files or image_io.dicom_series_files(case.path)
    return dicom_seg.write_dicom_seg(labels, files, output_path,
                                     getattr(predictor, "provenance", None),
                                     getattr(predictor, "weights_dir", None))


def segment_one(predictor, image, output_path, read_start, name, replace_1mm_spacing=False,
                case=None):
    """Segment one image and write its labels; returns the report fields. ``case``: the input
    (needed for a DICOM SEG output, which refers to its slices)."""
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
    notes = write_output(labels, output_path, case, predictor)
    if notes:
        fields["output_notes"] = notes
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
               for network in method.NETWORKS}
    if not any(origins.values()):
        return None
    return ", ".join(f"{network} = {origin or 'unrecorded'}" for network, origin in origins.items())


def summary_line(record):
    """The one line printed for a case."""
    if "error" in record:
        return f"{record['case']}: FAILED: {record['error']}"
    if "skipped" in record:
        return f"{record['case']}: kept the existing {record['output']} (it reads whole, on the " \
               "input's grid)"
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
    """The command; returns the exit status (0 ok, 1 some case failed or the report could not be
    written, 2 nothing done or every case failed, 130 interrupted).

    ``predictor``: an already loaded ``Predictor`` to use instead of loading --weights.
    """
    args = parse_args(argv)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(args.verbose)
    try:
        records, report_error = run(
            args.input_dir, args.output_dir, args.weights, args.report, not args.quiet,
            args.output_format, args.replace_1mm_spacing, predictor,
            skip_existing=args.skip_existing, overwrite=args.overwrite, max_gib=args.max_gib,
            min_island_fraction=args.min_island_fraction)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the outputs written so far are complete (none is half-written); "
              "run again with --skip-existing to go on", file=sys.stderr)
        return 130
    failed = [r["case"] for r in records if "error" in r]
    kept = sum(1 for r in records if "skipped" in r)
    warned = sum(1 for r in records if r.get("warnings") and "error" not in r)
    print(f"{len(records) - len(failed)} ok, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "")
          + (f"; {warned} with warnings" if warned else "")
          + (f"; {kept} existing outputs kept" if kept else "")
          + ("; the report is incomplete" if report_error else ""), file=sys.stderr)
    if records and len(failed) == len(records):
        return 2
    return 1 if failed or report_error else 0
