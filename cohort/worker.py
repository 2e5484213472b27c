"""One worker's part: read a case, segment it with a Predictor loaded once, write its outputs
(temporary name, read back, rename: app/io.py and app/dicom_seg.py), measure it for the cohort
table. ``Segmenter`` holds the Predictor and reads the next case while the current one is
segmented; ``cohort/run.py`` makes it a Ray actor.

Each attempt at a case appends to ``OUTPUT/logs/NAME.log`` (``started`` with the process and host,
then ``finished`` or ``failed``): the driver counts the attempts there, across worker deaths.
"""

import os
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app import cli
from app import io as image_io
from app import method

OUTPUT_FORMATS = {"nii.gz": ("nii.gz",), "dicom-seg": ("dicom-seg",),
                  "both": ("nii.gz", "dicom-seg")}
LABELS_FOLDER = "labels"
LOGS_FOLDER = "logs"


def output_paths(case, output_dir, output_format):
    """{format: path} of a case's outputs under OUTPUT/labels: NAME.nii.gz and/or NAME.dcm. A
    DICOM SEG is made for DICOM series only; with ``both`` other cases get their NIfTI alone."""
    folder = Path(output_dir) / LABELS_FOLDER
    paths = {}
    for fmt in OUTPUT_FORMATS[output_format]:
        if fmt == image_io.DICOM_SEG and case.format != image_io.DICOM \
                and output_format == "both":
            continue
        paths[fmt] = image_io.Case(case.name, case.path, case.format).output_path(folder, fmt)
    return paths


def log_line(output_dir, case, text):
    """Append one time-stamped line to the case's log (flushed: a killed worker leaves it)."""
    folder = Path(output_dir) / LOGS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(folder / f"{case.name}.log", "a", encoding="utf-8") as stream:
        stream.write(f"{stamp} {text}\n")
        stream.flush()
        os.fsync(stream.fileno())


def attempts_logged(output_dir, name):
    """How many attempts at case ``name`` its log records."""
    path = Path(output_dir) / LOGS_FOLDER / f"{name}.log"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    return sum(1 for line in lines if " started " in line)


def read(case, max_bytes=None):
    """A case's image and warnings, as ``app.io.read_case`` gives them (a DICOM case from its own
    files, which may share folders with other series)."""
    if case.problem:
        raise image_io.InputError(case.problem)
    if case.format != image_io.DICOM:
        return image_io.read_case(case.app_case(), max_bytes=max_bytes)
    image, warnings = image_io.read_dicom_series(case.path, max_bytes=max_bytes,
                                                 files=list(case.files))
    image_io.check_finite(image, case.path)
    warnings += (image_io.spacing_warnings(image, case.path)
                 + image_io.intensity_warnings(image, case.path))
    return image, warnings


def organ_hu(image, labels):
    """{organ: (mean HU, median HU)} of the image's voxels under each label; None for an organ
    absent. Computed inside the labels' bounding box (the organs), array order (z, y, x)."""
    import SimpleITK as sitk

    label_array = sitk.GetArrayViewFromImage(labels)
    nonzero = np.nonzero(label_array.any(axis=(1, 2)))[0]
    result = {name: (None, None) for name in method.LABELS.values()}
    if nonzero.size == 0:
        return result
    box = slice(nonzero[0], nonzero[-1] + 1)
    values = sitk.GetArrayViewFromImage(image)[box]
    label_array = label_array[box]
    for label, name in method.LABELS.items():
        organ = values[label_array == label].astype(np.float64)
        if organ.size:
            result[name] = (round(float(organ.mean()), 1), round(float(np.median(organ)), 1))
    return result


def segment_case(predictor, case, image, warnings, output_dir, output_format, read_seconds,
                 read_wait_seconds=None):
    """Segment one read case and write its outputs; returns the manifest record (measurements
    for the cohort table included). ``read_wait_seconds``: how long the worker waited for the
    read (less than ``read_seconds`` when it overlapped the last case; default all of it)."""
    if read_wait_seconds is None:
        read_wait_seconds = read_seconds
    start = time.perf_counter()
    result, device = cli.predict_with_cpu_fallback(predictor, image, case.name)
    predict_seconds = time.perf_counter() - start
    outputs, notes = {}, []
    write_start = time.perf_counter()
    for fmt, path in output_paths(case, output_dir, output_format).items():
        notes += cli.write_output(result.labels, path, case, predictor,
                                  source_files=list(case.files) or None)
        outputs[fmt] = str(path)
    seconds = {"read": round(read_seconds, 3), "read_wait": round(read_wait_seconds, 3),
               **result.seconds, "write": round(time.perf_counter() - write_start, 3)}
    # the case's time on its worker: what reading did not overlap, predicting, writing
    seconds["total"] = round(read_wait_seconds + predict_seconds + seconds["write"], 3)
    hu = organ_hu(image, result.labels)
    return {
        "status": "done", "outputs": outputs, "warnings": warnings + notes,
        "size_xyz": list(image.GetSize()),
        "spacing_mm_xyz": [round(s, 4) for s in image.GetSpacing()],
        "roi_mm": result.roi_mm, "seconds": seconds,
        "volumes_ml": cli.organ_volumes_ml(result.labels),
        "hu_mean": {organ: values[0] for organ, values in hu.items()},
        "hu_median": {organ: values[1] for organ, values in hu.items()},
        "device": device or "default", "peak_memory_mb": cli.peak_memory_mb(),
    }


class Segmenter:
    """Loads the Predictor once, then segments cases one after the other; while one case is
    segmented the next one (``next_case`` of ``segment``) is read in a thread."""

    def __init__(self, weights_dir, output_dir, output_format):
        from app.predictor import Predictor
        from app.weights import DEFAULT_WEIGHTS_DIR

        self.predictor = Predictor(Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR)
        self.output_dir, self.output_format = Path(output_dir), output_format
        self.max_bytes = image_io.default_max_bytes()
        self.reader = ThreadPoolExecutor(1)
        self.prefetched = {}  # case name -> Future of (image, warnings, seconds)

    def _read_timed(self, case):
        start = time.perf_counter()
        image, warnings = read(case, self.max_bytes)
        return image, warnings, time.perf_counter() - start

    def segment(self, case, next_case=None):
        """The manifest record of ``case`` (status done, or failed with the error); starts
        reading ``next_case``. Errors of the case are returned, not raised; a dying process is
        Ray's to retry."""
        log_line(self.output_dir, case, f"started pid={os.getpid()} host={socket.gethostname()}")
        pending = self.prefetched.pop(case.name, None) or self.reader.submit(self._read_timed,
                                                                              case)
        for stale in list(self.prefetched):  # a hint the driver did not follow
            self.prefetched.pop(stale).cancel()
        if next_case is not None:
            self.prefetched[next_case.name] = self.reader.submit(self._read_timed, next_case)
        start = time.perf_counter()
        try:
            problem = cli.seg_input_problem(case, self.output_format)  # dicom-seg: DICOM only
            if problem:
                raise image_io.InputError(problem)
            image, warnings, read_seconds = pending.result()
            record = segment_case(self.predictor, case, image, warnings, self.output_dir,
                                  self.output_format, read_seconds, time.perf_counter() - start)
            del image
            log_line(self.output_dir, case, f"finished in {record['seconds']['total']:.1f} s")
        except Exception as error:  # one bad case must not stop the worker
            reason = error_line(case, error)
            record = {"status": "failed", "error": reason}
            log_line(self.output_dir, case, f"failed: {reason}")
            log_line(self.output_dir, case, "".join(traceback.format_exception(error)).rstrip())
        record["host"], record["node"], record["pid"] = socket.gethostname(), node(), os.getpid()
        return record

    def ping(self):
        return os.getpid()


def node():
    """The Ray node's address this worker runs on (its host name outside Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return socket.gethostname()


def error_line(case, error):
    """The error line of a case: the reason after its path, unless the reason names it."""
    text = cli.describe_error(error)
    return text if text.startswith(str(case.path)) else f"{case.path}: {text}"

