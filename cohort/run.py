"""The cohort driver: discover cases, skip those done before, segment the rest on Ray actors,
record every case in the manifest, write the cohort table.

Why Ray actors (not Ray Data's map_batches): a case is one large volume, not a row; each actor
keeps its Predictor for every case it gets, reads its next case while segmenting the current
one, writes the outputs itself (no label image travels through the object store), and one case
is one actor task, so a worker's death costs exactly that case, which Ray retries
(``max_task_retries``) on the restarted actor (``max_restarts``). The driver alone writes the
manifest, so it needs no locking.
"""

import os
import sys
import time
from collections import deque
from pathlib import Path

from app import io as image_io
from cohort import table as cohort_table
from cohort.discover import HeaderCache, discover
from cohort.manifest import Manifest
from cohort.worker import LABELS_FOLDER, Segmenter, attempts_logged, output_paths

ROOT = Path(__file__).resolve().parent.parent  # holds app/ and cohort/: the workers' import path
# tries per case when its worker dies (Ray retries the task MAX_ATTEMPTS - 1 times)
MAX_ATTEMPTS = 3
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20  # --ray local: cases never travel through it
# A local cluster listens on a loopback address only. Not 127.0.0.1: Ray replaces that one with
# the machine's network address (ray._private.services.resolve_ip_for_localhost).
LOCAL_NODE_IP = "127.0.0.2"
WAIT_SECONDS = 30.0  # a progress line at least this often while cases run
HEADER_CACHE = "discovery.sqlite"  # DICOM headers read before (cohort/discover.py)


def connect(address, local_cpus=None):
    """Join a Ray cluster: ``local`` starts one on this machine, ``auto`` finds a running one
    (``ray start`` / KubeRay / a Slurm script), anything else is its address."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": python_path, "TF_CPP_MIN_LOG_LEVEL": "2"}}
    options = {"runtime_env": runtime_env, "log_to_driver": False, "logging_level": "WARNING"}
    if address == "local":  # "local": a new cluster, never one found in /tmp/ray or RAY_ADDRESS
        ray.init(address="local", num_cpus=local_cpus,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False,
                 _node_ip_address=LOCAL_NODE_IP, **options)
    else:
        ray.init(address=address, **options)
    return ray


def output_problem(case, paths):
    """None if every output of ``case`` exists, reads whole and lies on the input's grid; else
    why not."""
    from app import dicom_seg

    image = None
    for fmt, path in paths.items():
        if case.format != image_io.DICOM and fmt != image_io.DICOM_SEG:
            problem = image_io.existing_output_problem(case.app_case(), path)
        else:
            if not Path(path).is_file():
                return f"{Path(path).name} missing"
            if image is None:
                try:
                    with image_io.quiet_itk():
                        image, _ = image_io.read_dicom_series(case.path, files=list(case.files))
                except image_io.InputError as error:
                    return f"the input cannot be read ({error})"
            if fmt == image_io.DICOM_SEG:
                problem = dicom_seg.existing_seg_problem(path, list(case.files), image)
            else:
                problem = labels_file_problem(path, image)
        if problem:
            return f"{Path(path).name}: {problem}"
    return None


def labels_file_problem(path, grid):
    """None if ``path`` reads whole as uint8 labels on ``grid``'s geometry, else why not."""
    import SimpleITK as sitk

    try:
        image_io.check_complete(path, image_io.image_format(Path(path).name))
        with image_io.quiet_itk():
            labels = sitk.ReadImage(str(path))
    except (image_io.InputError, RuntimeError) as error:
        return f"unreadable ({error})"
    if labels.GetPixelID() != sitk.sitkUInt8:
        return "not uint8 labels"
    difference = image_io.grid_difference(labels, grid)
    return f"on another grid: {difference}" if difference else None


def duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """One line per finished case: counts, this run's rate and the estimated time left."""

    def __init__(self, total, stream=None):
        self.total, self.finished = total, 0
        self.stream = stream or sys.stdout  # the one of now, not of the import
        self.start = time.perf_counter()

    def line(self, name, text):
        self.finished += 1
        elapsed = time.perf_counter() - self.start
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - self.finished) / rate) if rate else "?"
        print(f"[{self.finished}/{self.total}] {name}: {text} | {rate * 3600:.0f} cases/h | "
              f"ETA {eta}", file=self.stream, flush=True)


def plan(cases, manifest, output_dir, output_format):
    """(to verify, to do): the cases whose manifest row says done for this very input and these
    output paths (with their paths), and the rest."""
    candidates, todo = [], []
    for case in cases:
        entry = manifest.get(case.name)
        paths = {fmt: str(p) for fmt, p in output_paths(case, output_dir, output_format).items()}
        if entry and entry["status"] == "done" and entry["identity"] == case.identity \
                and entry["outputs"] == paths:
            candidates.append((case, paths))
        else:
            todo.append(case)
    return candidates, todo


def verify(ray, candidates, cpus_per_task):
    """[(case, problem or None)]: the outputs of earlier runs checked (``output_problem``), one
    Ray task per case across the cluster: reading them back costs about as much as reading the
    input, which a rerun of a large archive cannot afford on the driver alone."""
    check = ray.remote(output_problem).options(num_cpus=cpus_per_task)
    print(f"verifying the outputs of {len(candidates)} case(s) done before", file=sys.stderr,
          flush=True)
    problems = ray.get([check.remote(case, paths) for case, paths in candidates])
    return [(case, problem) for (case, _), problem in zip(candidates, problems)]


def run(input_dir, output_dir, ray_address="local", cpus_per_worker=1.0, gpus_per_worker=None,
        workers=None, weights_dir=None, output_format="nii.gz", local_cpus=None):
    """Segment every case under ``input_dir`` into ``output_dir``; returns (the manifest's rows
    of these cases, the cases kept from earlier runs, the skipped files).

    Raises FileNotFoundError / NotADirectoryError / PermissionError / ValueError before any
    work (no case, output not writable, weights missing).
    """
    output_dir = Path(output_dir)
    image_io.check_input_folder(input_dir)
    image_io.check_writable(output_dir / LABELS_FOLDER)
    cache = HeaderCache(output_dir / HEADER_CACHE)
    try:
        cases, skipped = discover(input_dir, cache)
    finally:
        cache.close()
    for item in skipped:
        print(f"skipped: {item.path}: {item.reason}", file=sys.stderr)
    if not cases:
        raise FileNotFoundError(f"{input_dir}: no case found (no image file and no CT series)")
    check_weights(weights_dir)
    for folder in (output_dir, output_dir / LABELS_FOLDER):
        removed = image_io.remove_stale_partials(folder)
        if removed:
            print(f"removed {len(removed)} temporary file(s) of an interrupted run from {folder}",
                  file=sys.stderr)
    manifest = Manifest(output_dir)
    ray = connect(ray_address, local_cpus)
    try:
        candidates, todo = plan(cases, manifest, output_dir, output_format)
        kept = []
        for case, problem in verify(ray, candidates, cpus_per_worker) if candidates else []:
            if problem is None:
                kept.append(case)
            else:
                print(f"{case.name}: segmented again: {problem}", file=sys.stderr)
                todo.append(case)
        print(f"{len(cases)} cases ({len(kept)} done before, kept), {len(todo)} to segment; "
              f"{len(skipped)} files skipped", file=sys.stderr, flush=True)
        if todo:
            segment_all(ray, todo, manifest, output_dir, output_format, cpus_per_worker,
                        gpus_per_worker, workers, weights_dir)
    finally:
        ray.shutdown()
    try:
        # a worker killed while writing left its temporary files; no case runs any more
        image_io.remove_stale_partials(output_dir / LABELS_FOLDER)
        names = {case.name for case in cases}
        rows = [row for row in manifest.rows() if row["name"] in names]
        cohort_table.write(rows, {case.name: case.header for case in cases}, output_dir)
        return rows, kept, skipped
    finally:
        manifest.close()


def check_weights(weights_dir):
    """Refuse (FileNotFoundError/ValueError) a weights folder the workers could not load, before
    any worker starts."""
    from app import weights

    folder = Path(weights_dir) if weights_dir else weights.DEFAULT_WEIGHTS_DIR
    for name in weights.WEIGHTS_FILES.values():
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: weights file missing")
    weights.read_settings(folder)


def start_workers(ray, count, cpus_per_worker, gpus_per_worker, weights_dir, output_dir,
                  output_format):
    """``count`` Segmenter actors, each with its Predictor loaded; restarted without limit when
    their process dies, each task retried ``MAX_ATTEMPTS - 1`` times."""
    actor = ray.remote(Segmenter).options(
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or 0, max_restarts=-1,
        max_task_retries=MAX_ATTEMPTS - 1)
    weights = str(Path(weights_dir).resolve()) if weights_dir else None
    actors = [actor.remote(weights, str(output_dir.resolve()), output_format)
              for _ in range(count)]
    try:
        ray.get([a.ping.remote() for a in actors])
    except ray.exceptions.RayError as error:  # a Predictor that cannot load, on any node
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"the workers could not start ({type(error).__name__}: "
                         f"{first[:300]}); see the Ray logs of the nodes") from None
    return actors


def segment_all(ray, todo, manifest, output_dir, output_format, cpus_per_worker,
                gpus_per_worker, workers, weights_dir):
    """Segment ``todo`` on Ray actors, recording each case in ``manifest`` as it finishes."""
    resources = ray.cluster_resources()
    if gpus_per_worker is None:  # GPU workers where the cluster has GPUs
        gpus_per_worker = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if workers is None:
        workers = (int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker
                   else int(resources.get("CPU", 1) // cpus_per_worker))
    workers = max(1, min(workers, len(todo)))
    device = f", {gpus_per_worker:g} GPU" if gpus_per_worker else ""
    print(f"starting {workers} worker(s) ({cpus_per_worker:g} CPU{device} each) on a Ray "
          f"cluster of {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs",
          file=sys.stderr, flush=True)
    actors = start_workers(ray, workers, cpus_per_worker, gpus_per_worker, weights_dir,
                           output_dir, output_format)
    manifest.mark_running(todo)
    dispatch(ray, actors, todo, manifest, output_dir)


def dispatch(ray, actors, todo, manifest, output_dir):
    """Keep every actor busy: each gets one case and, as a hint, the next one it will get (it
    reads that one while segmenting)."""
    queue, upcoming, running = deque(todo), {}, {}
    progress = Progress(len(todo))

    def submit(actor):
        case = upcoming.pop(actor, None) or (queue.popleft() if queue else None)
        if case is None:
            return
        upcoming[actor] = queue.popleft() if queue else None
        if upcoming[actor] is None:
            del upcoming[actor]
        running[actor.segment.remote(case, upcoming.get(actor))] = (actor, case)

    for actor in actors:
        submit(actor)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_SECONDS)
        if not ready:
            print(f"... {len(running)} case(s) running, {progress.finished}/{progress.total} "
                  "finished", file=sys.stderr, flush=True)
            continue
        for ref in ready:
            actor, case = running.pop(ref)
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as error:  # its worker died every time
                attempts = attempts_logged(output_dir, case.name)
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                record = {"status": "failed",
                          "error": f"{case.path}: its worker died {attempts} time(s) while "
                                   f"segmenting it (Ray gave up after {MAX_ATTEMPTS} attempts; "
                                   f"{type(error).__name__}: {first[:200]})"}
            attempts = attempts_logged(output_dir, case.name)
            outputs = record.pop("outputs", {})
            manifest.put(case, record["status"], outputs, record.get("error"), attempts, record)
            if record["status"] == "done":
                text = f"done in {record['seconds']['total']:.1f} s"
                if attempts > 1:
                    text += f" (attempt {attempts})"
            else:
                text = f"FAILED: {record['error']}"
            progress.line(case.name, text)
            submit(actor)
