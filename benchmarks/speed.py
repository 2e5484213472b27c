"""Speed and memory per stage, one process per case and a whole folder in one process.

    python -m benchmarks.speed [--sizes 100 300 600] [--no-real] [--repeats 1]
        [--modes process folder] [--variants fast plain] [--no-predict-sh] [--work DIR]
        [--json FILE]

Cases: generated 512 x 512 x N images (``--sizes``; 0.8 mm in-plane, slices spread over
``--length-mm`` so that every size shows the same abdomen, cached in ``--work``) and every
``*_0000.nii.gz`` in ../shared/data/images (``--no-real`` leaves them out).

Variants (``--variants``): ``fast`` is the shipped path (``Predictor()``: default precision,
separable preprocessing, labels resampled by cells, an organ's small pieces dropped);
``fast-float32`` the same in float32; ``fast-argmax`` the same without dropping small pieces
(the plain argmax: the difference in ``resampling_back`` is that step's cost);
``plain`` the step-by-step float32 reference (``Predictor(precision="float32", plain=True)``,
what the code did before the fast path); ``fast-lowmem`` the shipped path in a process started
with ``LOW_MEMORY_ENV`` (oneDNN on malloc with huge pages instead of TensorFlow's pool). Every
variant runs in the same benchmark, interleaved per repeat, so that they share the machine's
load.

Modes (``--modes``): ``process`` starts a fresh Python process per case and variant (the
organisers' protocol: start-up and model loading are paid per case); ``folder`` runs all cases
in one process per variant, reading the next image while the current one is segmented, as the
command line does. Each process records, per stage, the seconds and the peak resident memory
(RSS sampled every 5 ms in the stage's time window; ``ru_maxrss`` for the whole process):
start and imports (from the process's creation to the app imported; TensorFlow is not imported
yet), model load (``Predictor()``: reading and checking the weights files; it starts the loading
thread and returns), read, orientation, localization preprocessing, waiting for the loading
thread (TensorFlow import, graphs, warm-up run of the localization network), localization
network, segmentation preprocessing, waiting for the SCN's graph and warm-up, SCN, resampling
back, write. Reading and writing are SimpleITK's
own (``write`` at SimpleITK's default gzip level; ``write_level_1`` is the same file at level 1,
for comparison, outside the stages but inside the process's wall time); ``predict.sh`` rows
(``--no-predict-sh`` leaves them out) run the shipped command line itself, with its input checks,
and give its wall time and peak RSS.

It also prints the networks' arithmetic for the input sizes the cases used (FLOPs of the
convolutions, counted on the traced graph) and the rate each network achieved, against this
CPU's measured float32 and bfloat16 matrix-multiply rates. Timings on a shared machine are
noisy: the load average is printed before and after; compare variants within one run.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from evaluation.sampling import PeriodicSampler

ROOT = Path(__file__).resolve().parent.parent
REAL_IMAGES = ROOT.parent / "shared" / "data" / "images"
IMAGE_SUFFIX = "_0000.nii.gz"
# Memory settings of the process (environment, read at start-up): oneDNN's tensors from malloc
# instead of TensorFlow's pool, which keeps its peak (RSS) after the network has run; and
# malloc asking for transparent huge pages, which makes fresh buffers cheap to fault in.
LOW_MEMORY_ENV = {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
# variant -> (Predictor keyword arguments, environment of the process)
VARIANTS = {
    "fast": ({}, {}),
    "fast-lowmem": ({}, LOW_MEMORY_ENV),
    "fast-float32": ({"precision": "float32"}, {}),
    "fast-argmax": ({"min_island_fraction": 0.0}, {}),
    "plain": ({"precision": "float32", "plain": True}, {}),
}
PREDICT_STAGES = ("orientation", "localization_preprocessing", "localization_warm_up",
                  "localization_network", "segmentation_preprocessing", "segmentation_warm_up",
                  "segmentation_network", "resampling_back")
STAGES = ("start_and_imports", "model_load", "read", *PREDICT_STAGES, "write")
SAMPLE_INTERVAL_S = 0.005
MB = 2 ** 20


# --- the measured process ----------------------------------------------------------------------

class RssSampler(PeriodicSampler):
    """Resident memory of this process every ``interval_s`` seconds: (time.time(), bytes)."""

    def __init__(self, interval_s=SAMPLE_INTERVAL_S):
        super().__init__(self._reading, interval_s, name="rss")
        self._statm = open("/proc/self/statm")  # read repeatedly until stop
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _reading(self):
        self._statm.seek(0)
        return time.time(), int(self._statm.read().split()[1]) * self._page

    def stop(self):
        samples = super().stop()
        self._statm.close()
        return samples

    def peak_mb(self, start, stop):
        """Largest sample in [start, stop] (time.time()), MB; None without a sample there."""
        inside = [rss for t, rss in self.samples if start <= t <= stop]
        return round(max(inside) / MB, 1) if inside else None


def max_rss_mb():
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux), MB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def write_image(image, path, level):
    """Write ``image`` gzip-compressed at ``level`` (-1: SimpleITK's default); seconds."""
    import SimpleITK as sitk

    start = time.perf_counter()
    sitk.WriteImage(image, str(path), True, level)
    return time.perf_counter() - start


def child(variant, images, output_dir, result_path):
    """Segment ``images`` in this process with one ``Predictor``; write per-stage records."""
    import psutil

    created = psutil.Process().create_time()
    sampler = RssSampler().start()
    import SimpleITK as sitk

    # TensorFlow is not imported here: the Predictor's loading thread imports it while the first
    # image is read and prepared, and what that costs the case shows as the warm-up waits.
    from app.predictor import Predictor

    windows = {"start_and_imports": (created, time.time())}
    start = time.time()
    predictor = Predictor(**VARIANTS[variant][0])
    windows["model_load"] = (start, time.time())
    one_time = {stage: round(stop - begin, 3) for stage, (begin, stop) in windows.items()}
    one_time_peak = {stage: sampler.peak_mb(*window) for stage, window in windows.items()}
    records = []
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(1) as reader:
        pending = reader.submit(sitk.ReadImage, str(images[0]))
        for index, path in enumerate(images):
            begin = time.time()
            image = pending.result()
            read_end = time.time()
            if index + 1 < len(images):
                pending = reader.submit(sitk.ReadImage, str(images[index + 1]))
            result = predictor.predict(image)
            predict_end = time.time()
            name = Path(path).name[: -len(IMAGE_SUFFIX)]
            write_seconds = write_image(result.labels, output_dir / f"{name}.nii.gz", -1)
            write_end = time.time()
            level_1_seconds = write_image(result.labels, output_dir / f"{name}.level1.nii.gz", 1)
            seconds = {"read": round(read_end - begin, 3), **result.seconds,
                       "write": round(write_seconds, 3)}
            # stage windows in wall-clock time, from the predictor's laps
            stage_windows = {"read": (begin, read_end)}
            clock = read_end
            for stage in PREDICT_STAGES:  # the predictor's laps, in order
                stage_windows[stage] = (clock, clock + result.seconds.get(stage, 0.0))
                clock += result.seconds.get(stage, 0.0)
            stage_windows["resampling_back"] = (stage_windows["resampling_back"][0], predict_end)
            stage_windows["write"] = (predict_end, write_end)
            records.append({
                "case": name, "size_xyz": list(image.GetSize()), "seconds": seconds,
                "peak_mb": {stage: sampler.peak_mb(*window)
                            for stage, window in stage_windows.items()},
                "max_rss_mb": max_rss_mb(),
                "write_level_1": round(level_1_seconds, 3),
                "localization_spacing_mm": result.localization_spacing_mm,
                "crop_size_xyz": list(result.crop_size),
                "roi_size_xyz": result.roi_index["size_xyz"],
            })
            del image, result
    sampler.stop()
    Path(result_path).write_text(json.dumps({
        "variant": variant, "precision": predictor.precision, "one_time": one_time,
        "one_time_peak_mb": one_time_peak, "cases": records, "max_rss_mb": max_rss_mb()}))


# --- the benchmark ----------------------------------------------------------------------------

def prepare_cases(work, sizes, length_mm, real, seed=5):
    """{name: image path}: generated cases (cached in ``work``) and the real images."""
    cases = {}
    for slices in sizes:
        name = f"gen512x512x{slices}"
        folder = work / "cases" / name
        path = folder / f"{name}{IMAGE_SUFFIX}"
        if not path.exists():
            from synthetic import CaseGeometry, write_case

            geometry = CaseGeometry((512, 512, slices), (0.8, 0.8, length_mm / slices),
                                    (0.0, 0.0, 0.0))
            write_case(folder, name, seed, geometry=geometry)
            (folder / f"{name}.nii.gz").unlink()  # only the image goes in
        cases[name] = path
    if real:
        for image in sorted(REAL_IMAGES.glob(f"*{IMAGE_SUFFIX}")):
            name = image.name[: -len(IMAGE_SUFFIX)]
            folder = work / "cases" / name
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / image.name).exists():
                shutil.copy(image, folder / image.name)
            cases[name] = folder / image.name
    return cases


def run_child(variant, images, work, tag):
    """One measured process; returns its record with the parent's wall time added."""
    result = work / "results" / f"{tag}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.speed", "--child", variant,
               "--output-dir", str(work / "outputs" / tag), "--result", str(result),
               *map(str, images)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
                   **VARIANTS[variant][1]}
    log = work / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as stderr:
        finished = subprocess.run(command, cwd=ROOT, env=environment, stderr=stderr)
    if finished.returncode:
        raise RuntimeError(f"{tag} failed (exit {finished.returncode}); its log {log}:\n"
                           + log.read_text()[-3000:])
    record = json.loads(result.read_text())
    record["wall_seconds"] = round(time.perf_counter() - start, 3)
    return record


def run_predict_sh(folder, work, tag):
    """The shipped command line on a folder: wall seconds and the process's peak RSS (MB)."""
    output = work / "outputs" / tag
    shutil.rmtree(output, ignore_errors=True)
    command = [str(ROOT / "predict.sh"), str(folder), str(output), "--quiet"]
    log = work / "logs" / f"{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode:
        raise RuntimeError(f"predict.sh failed on {folder} (exit {process.returncode}); its log "
                           f"{log}:\n" + log.read_text()[-3000:])
    return {"wall_seconds": round(wall, 3), "max_rss_mb": round(usage.ru_maxrss / 1024.0, 1)}


def matmul_rates_gflops(size=3072, repeats=15):
    """This CPU's matrix-multiply rate with TensorFlow, float32 and bfloat16: best GFLOP/s.

    The best of ``repeats`` products of two ``size`` x ``size`` matrices: on a shared machine
    the best run comes closest to what the cores can do.
    """
    import tensorflow as tf

    rates = {}
    for dtype in (tf.float32, tf.bfloat16):
        a = tf.cast(tf.random.normal([size, size]), dtype)
        b = tf.cast(tf.random.normal([size, size]), dtype)
        multiply = tf.function(lambda x, y: tf.matmul(x, y))
        multiply(a, b).numpy()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            multiply(a, b).numpy()
            best = min(best, time.perf_counter() - start)
        rates[dtype.name] = round(2 * size ** 3 / best / 1e9, 1)
    return rates


class FlopCounter:
    """FLOPs of the two networks' convolutions for given input sizes, from traced graphs."""

    def __init__(self):
        from app.networks import build_localization_net, build_scn

        self.networks = {"localization": build_localization_net(), "scn": build_scn()}
        self.cache = {}

    def gflop(self, network, size_xyz):
        """GFLOP (multiply and add counted apart) of ``network`` on an input of ``size_xyz``."""
        import numpy as np
        import tensorflow as tf

        key = (network, tuple(size_xyz))
        if key not in self.cache:
            model = self.networks[network]
            spec = tf.TensorSpec([1, *reversed(size_xyz), 1], tf.float32)
            graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(
                spec).graph
            total = 0
            for op in graph.get_operations():
                if op.type == "Conv3D":
                    output, kernel = op.outputs[0].shape, op.inputs[1].shape
                    if not (output.is_fully_defined() and kernel.is_fully_defined()):
                        raise ValueError(f"{network}: a convolution without a static shape")
                    total += 2 * int(np.prod(output[:-1])) * int(np.prod(kernel))
            self.cache[key] = total / 1e9
        return self.cache[key]


def localization_size(image_path):
    """The localization network's input size (x, y, z) for an image file (header only)."""
    import SimpleITK as sitk

    from app.geometry import Grid
    from app.localization import localization_grid

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image_path))
    reader.ReadImageInformation()
    grid = Grid(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return localization_grid(grid).size  # canonical orientation permutes axes only


def summarise(values):
    """'min / median' of a list of numbers (one value when there is one)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f} / {statistics.median(values):.2f}"


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(process_runs, folder_runs, predict_sh, flops, rates, cases):
    """Print the per-stage tables (min / median over repeats) and the arithmetic."""
    short = {"start_and_imports": "start+imp", "model_load": "model", "read": "read",
             "orientation": "orient", "localization_preprocessing": "loc-pre",
             "localization_warm_up": "loc-wait", "segmentation_warm_up": "seg-wait",
             "localization_network": "loc-net", "segmentation_preprocessing": "seg-pre",
             "segmentation_network": "SCN", "resampling_back": "back", "write": "write"}
    for mode, runs in (("one process per case", process_runs), ("folder in one process",
                                                                 folder_runs)):
        if not runs:
            continue
        rows, memory_rows = [], []
        for (case, variant), records in runs.items():
            seconds = {stage: summarise([r[stage] for r in records]) for stage in STAGES}
            totals = [sum(v for k, v in r.items() if k in STAGES and k not in
                          (("start_and_imports", "model_load") if mode.startswith("folder")
                           else ())) for r in records]
            walls = [r["wall"] for r in records if r.get("wall") is not None]
            rows.append([case, variant, *(seconds[s] for s in STAGES), summarise(totals),
                         summarise(walls), summarise([r["level1"] for r in records])])
            memory_rows.append([case, variant, *(summarise([r["peak"][s] for r in records])
                                                 for s in STAGES),
                                summarise([r["max_rss_mb"] for r in records])])
        total_name = "per case" if mode.startswith("folder") else "stages"
        print_table(f"{mode}: seconds (min / median over repeats)",
                    ["case", "variant", *(short[s] for s in STAGES), total_name, "wall",
                     "write@1"], rows)
        print_table(f"{mode}: peak RSS MB in each stage (sampled) and ru_maxrss",
                    ["case", "variant", *(short[s] for s in STAGES), "max RSS"], memory_rows)
    if predict_sh:
        print_table("predict.sh (the shipped command line): wall seconds, peak RSS MB",
                    ["input", "wall", "max RSS"],
                    [[name, summarise([r["wall_seconds"] for r in records]),
                      summarise([r["max_rss_mb"] for r in records])]
                     for name, records in predict_sh.items()])
    if flops:
        rows = []
        for (case, variant), record in flops.items():
            for network, stage in (("localization", "localization_network"),
                                   ("scn", "segmentation_network")):
                gflop, seconds, precision = record[network], record[stage], record["precision"]
                rate = gflop / seconds if seconds else float("nan")
                rows.append([case, variant, network, "x".join(map(str, record[f"{network}_size"])),
                             f"{gflop:.1f}", f"{seconds:.2f}", f"{rate:.1f}",
                             f"{100 * rate / rates[precision]:.0f}% of {precision}"])
        print_table(f"arithmetic: network GFLOP per case and achieved GFLOP/s (best run); "
                    f"matmul rate float32 {rates['float32']} GFLOP/s, bfloat16 "
                    f"{rates['bfloat16']} GFLOP/s",
                    ["case", "variant", "network", "input xyz", "GFLOP", "s", "GFLOP/s",
                     "of matmul"], rows)


def flatten(record, case_record, mode):
    """One row of stage seconds and peaks from a child's record."""
    one_time = record["one_time"] if mode == "process" else {}
    seconds = {**{s: one_time.get(s) for s in ("start_and_imports", "model_load")},
               **case_record["seconds"]}
    peak = {**{s: record["one_time_peak_mb"].get(s) if mode == "process" else None
               for s in ("start_and_imports", "model_load")}, **case_record["peak_mb"]}
    return {**{s: seconds.get(s) for s in STAGES}, "peak": {s: peak.get(s) for s in STAGES},
            "max_rss_mb": case_record["max_rss_mb"], "level1": case_record["write_level_1"],
            "wall": record.get("wall_seconds") if mode == "process" else None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 300, 600],
                        help="slices of the generated 512 x 512 cases")
    parser.add_argument("--length-mm", type=float, default=500.0,
                        help="length of the generated scans along z (slice spacing = it / N)")
    parser.add_argument("--no-real", action="store_true", help=f"leave out {REAL_IMAGES}")
    parser.add_argument("--modes", nargs="+", default=["process", "folder"],
                        choices=["process", "folder"])
    parser.add_argument("--variants", nargs="+", default=["fast", "plain"],
                        choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-predict-sh", action="store_true",
                        help="skip the runs of the shipped predict.sh")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for cases (kept, reused) and outputs (default: a new "
                             "temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write all records here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("images", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.images, args.output_dir, args.result)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # as ``python -m app`` leaves: without TensorFlow's teardown

    work = args.work or Path(tempfile.mkdtemp(prefix="benchmark-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = prepare_cases(work, args.sizes, args.length_mm, not args.no_real)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {platform.python_version()}; "
          f"load average at start {load_average()}")
    print("cases: " + ", ".join(f"{name} ({path})" for name, path in cases.items()))
    process_runs, folder_runs, predict_sh, raw = {}, {}, {}, []
    for repeat in range(args.repeats):
        if "process" in args.modes:
            for name, path in cases.items():
                for variant in args.variants:
                    record = run_child(variant, [path], work, f"process-{name}-{variant}-{repeat}")
                    raw.append({"mode": "process", "repeat": repeat, **record})
                    process_runs.setdefault((name, variant), []).append(
                        flatten(record, record["cases"][0], "process"))
                    print(f"  [{time.strftime('%H:%M:%S')}] process {name} {variant}: "
                          f"{record['wall_seconds']:.1f} s, {record['max_rss_mb']:.0f} MB",
                          flush=True)
                if not args.no_predict_sh:
                    predict_sh.setdefault(name, []).append(
                        run_predict_sh(path.parent, work, f"sh-{name}-{repeat}"))
        if "folder" in args.modes:
            for variant in args.variants:
                record = run_child(variant, list(cases.values()), work,
                                   f"folder-{variant}-{repeat}")
                raw.append({"mode": "folder", "repeat": repeat, **record})
                for case_record in record["cases"]:
                    folder_runs.setdefault((case_record["case"], variant), []).append(
                        flatten(record, case_record, "folder"))
                per_case = (record["wall_seconds"] - sum(record["one_time"].values())) / len(
                    cases)
                print(f"  [{time.strftime('%H:%M:%S')}] folder {variant}: "
                      f"{record['wall_seconds']:.1f} s for {len(cases)} cases "
                      f"({per_case:.1f} s per case after the model load), "
                      f"{record['max_rss_mb']:.0f} MB", flush=True)
            if not args.no_predict_sh:
                everything = work / "folder"
                everything.mkdir(exist_ok=True)
                for path in cases.values():
                    link = everything / path.name
                    if not link.exists():
                        link.symlink_to(path)
                predict_sh.setdefault("whole folder", []).append(
                    run_predict_sh(everything, work, f"sh-folder-{repeat}"))
    print(f"\nload average at end {load_average()}")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rates = matmul_rates_gflops()
    counter = FlopCounter()
    flops = {}
    for (name, variant), records in (process_runs or folder_runs).items():
        child_record = next(r for r in raw if any(c["case"] == name for c in r["cases"])
                            and r["variant"] == variant)
        case_record = next(c for c in child_record["cases"] if c["case"] == name)
        loc_size = localization_size(cases[name])
        best = {stage: min(r[stage] for r in records)
                for stage in ("localization_network", "segmentation_network")}
        flops[(name, variant)] = {
            "localization": counter.gflop("localization", loc_size),
            "scn": counter.gflop("scn", case_record["crop_size_xyz"]),
            "localization_size": loc_size, "scn_size": case_record["crop_size_xyz"],
            "precision": child_record["precision"], **best}
    report(process_runs, folder_runs, predict_sh, flops, rates, cases)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": cpu_name(), "cores": os.cpu_count(), "matmul_gflops": rates,
            "runs": raw, "predict_sh": predict_sh,
            "flops": {f"{k[0]}/{k[1]}": v for k, v in flops.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
