"""Score a folder of predictions against reference labels: DSC and NSD per organ, as FLARE does.

    python -m evaluation.evaluate --pred DIR --labels DIR [--out FILE.csv] [--protocol flare22]
        [--labelled FILE] [--workers N] [--resample]
        [--previews DIR [--previews-worst N] [--images DIR]]

Files pair by case name: ``NAME.nii.gz`` (or ``NAME_0000.nii.gz``, the image naming) in both
folders. Every organ of every case gets DSC and NSD (evaluation.surface: the surface Dice of the
challenges' surface-distance method, spacing from the label file). Writes FILE.csv (one row per
case and organ), FILE.md and FILE.json (summary per organ: mean +- std, median) and prints the
Markdown. A case that cannot be scored (unreadable file, no label, another grid) is reported with
its file and reason; the others go on, and the exit status is 1. ``evaluate_folder`` is the same
as a Python function.

Partly labelled references (a liver-only data set, say): a declaration of which organs each label
covers (``--labelled FILE``, or a labelled.json / dataset.json in the labels folder or the folder
above it; format in training/coverage.py) limits each case to its covered organs, and each organ's
mean is over the cases that cover it. Without one, every organ of every case is scored (FLARE
rules: an organ absent from the label but predicted scores 0).
"""

import argparse
import csv
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import method
from evaluation.metrics import challenge_scores, same_grid
from training.coverage import DECLARATION_FILES, covered_organs, read_declaration

# Challenge rules (../shared/METHOD.md, "Challenge evaluation").
FLARE21_TOLERANCE_MM = 1.0
FLARE22_TOLERANCES_MM = {"liver": 5.0, "kidney": 3.0, "spleen": 3.0, "pancreas": 5.0}
FLARE22_NSD_ZERO_BELOW_DSC = 0.2
PROTOCOLS = ("flare21", "flare22")

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
IMAGE_CHANNEL_SUFFIX = "_0000"  # challenge image naming: NAME_0000.nii.gz
DEFAULT_OUT_NAME = "evaluation.csv"
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))
CSV_COLUMNS = ("case", "organ", "label_id", "dsc", "nsd", "nsd_tolerance_mm", "label_voxels",
               "prediction_voxels", "label_volume_ml", "prediction_volume_ml",
               "prediction_resampled")


class CaseError(Exception):
    """A case cannot be scored; the message names the file and the reason."""


@dataclass(frozen=True)
class Protocol:
    """How NSD is computed: tolerance per organ name (mm) and FLARE22's low-DSC rule."""
    name: str
    tolerances_mm: dict
    nsd_zero_below_dsc: float | None = None


@dataclass
class Evaluation:
    """What ``evaluate_folder`` returns: rows (one per case and organ), the summary, problems."""
    rows: list
    summary: dict
    failures: dict = field(default_factory=dict)  # case -> error message
    labels_without_prediction: list = field(default_factory=list)
    resampled: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)  # "csv", "markdown", "json", "previews" -> paths
    labelled: Path | None = None  # the declaration of partly labelled cases, if any
    partial_cases: dict = field(default_factory=dict)  # case -> organ names its label covers


# --- Options --------------------------------------------------------------------------------------

def parse_organs(text):
    """``"1:liver,2:kidney"`` -> ``{1: "liver", 2: "kidney"}``."""
    organs = {}
    for item in text.split(","):
        label_id, _, name = item.strip().partition(":")
        if not label_id.strip().isdigit() or not name.strip():
            raise ValueError(f"organ {item!r} is not of the form ID:NAME (e.g. 1:liver)")
        organs[int(label_id)] = name.strip()
    return organs


def make_protocol(name, organs, tolerance_mm=None):
    """The Protocol for ``name`` ("flare21" or "flare22") and the organ names in ``organs``.

    flare21: NSD at 1 mm for every organ. flare22: liver 5, kidney 3, spleen 3, pancreas 5 mm and
    NSD = 0 when DSC < 0.2. ``tolerance_mm`` replaces every organ's tolerance.
    """
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    if tolerance_mm is not None and not tolerance_mm >= 0:
        raise ValueError(f"the NSD tolerance must be >= 0 mm, not {tolerance_mm}")
    if tolerance_mm is not None:
        tolerances = {organ: float(tolerance_mm) for organ in organs.values()}
    elif name == "flare21":
        tolerances = {organ: FLARE21_TOLERANCE_MM for organ in organs.values()}
    else:
        unknown = [organ for organ in organs.values() if organ not in FLARE22_TOLERANCES_MM]
        if unknown:
            raise ValueError(f"FLARE22 defines no NSD tolerance for {', '.join(unknown)}; "
                             "give one with --tolerance-mm")
        tolerances = {organ: FLARE22_TOLERANCES_MM[organ] for organ in organs.values()}
    return Protocol(name, tolerances, FLARE22_NSD_ZERO_BELOW_DSC if name == "flare22" else None)


# --- Files ----------------------------------------------------------------------------------------

def case_name(path):
    """Case name of an image file: ``NAME.nii.gz`` and ``NAME_0000.nii.gz`` are both NAME; None for
    files that are not images (or hidden)."""
    name = Path(path).name
    suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)
    if suffix is None or name.startswith("."):
        return None
    stem = name[:-len(suffix)]
    return stem[:-len(IMAGE_CHANNEL_SUFFIX)] if stem.endswith(IMAGE_CHANNEL_SUFFIX) else stem


def files_by_case(folder, prefer_image_naming=False):
    """{case name: [paths]} of the image files in a folder (several paths: an ambiguous case).

    A FLARE data folder holds both ``NAME_0000.nii.gz`` (the CT) and ``NAME.nii.gz`` (its label):
    such a pair is not ambiguous; the label naming is kept, or the image naming with
    ``prefer_image_naming``.
    """
    cases = {}
    for path in sorted(Path(folder).iterdir()):
        name = case_name(path)
        if name is not None and path.is_file():
            cases.setdefault(name, []).append(path)
    for name, paths in cases.items():
        channel = [p for p in paths if Path(p).name.startswith(name + IMAGE_CHANNEL_SUFFIX + ".")]
        plain = [p for p in paths if p not in channel]
        if len(channel) == 1 and len(plain) == 1:
            cases[name] = channel if prefer_image_naming else plain
    return cases


def read_image(path, role):
    """A 3-D scalar image; CaseError naming the file when it cannot be read or is not one."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        lines = str(error).strip().splitlines() or ["unreadable"]
        reason = lines[-1].removeprefix("sitk::ERROR: ")
        raise CaseError(f"cannot read {role} {path}: {reason}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(f"{role} {path} is not a 3-D single-channel image "
                        f"({image.GetDimension()}-D, "
                        f"{image.GetNumberOfComponentsPerPixel()} channels)")
    return image


def grid_differences(a, b):
    """Human-readable list of the grid properties (size, spacing, origin, direction) that differ."""
    def fmt(values):
        return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"

    differences = []
    if a.GetSize() != b.GetSize():
        differences.append(f"size {a.GetSize()} vs {b.GetSize()}")
    for name in ("Spacing", "Origin", "Direction"):
        first, second = getattr(a, f"Get{name}")(), getattr(b, f"Get{name}")()
        if not np.allclose(first, second, atol=1e-3 if name == "Origin" else 1e-6):
            differences.append(f"{name.lower()} {fmt(first)} vs {fmt(second)}")
    return differences


def prediction_on_label_grid(prediction, label, prediction_path, label_path, resample):
    """(prediction on the label's grid, whether it was resampled).

    Different grids: CaseError, or with ``resample`` nearest-neighbour resampling onto the label
    grid in physical space (background 0 outside the prediction).
    """
    if same_grid(prediction, label):
        return prediction, False
    if not resample:
        raise CaseError(f"prediction {prediction_path} lies on a different grid from label "
                        f"{label_path}: {'; '.join(grid_differences(prediction, label))} "
                        "(--resample resamples it onto the label grid, nearest neighbour)")
    return sitk.Resample(prediction, label, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         prediction.GetPixelID()), True


def find_declaration(labels_dir):
    """The labelled.json or dataset.json in ``labels_dir``, else in the folder above it (a FLARE
    folder holding images/ and labels/, or an nnU-Net one holding labelsTr/); None if none."""
    for folder in (Path(labels_dir), Path(labels_dir).parent):
        for name in DECLARATION_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def organs_by_case(cases, organs, labelled):
    """{case: the part of ``organs`` (label id -> name) its label covers} as the declaration
    file ``labelled`` says (None: every organ for every case). Raises ValueError
    (training.coverage.DeclarationError) naming the file for a bad declaration."""
    if labelled is None:
        return {case: dict(organs) for case in cases}
    declarations = read_declaration(labelled, organs)
    return {case: {label_id: name for label_id, name in organs.items()
                   if label_id in covered_organs(declarations, case)} for case in cases}


# --- Scoring --------------------------------------------------------------------------------------

def score_images(label, prediction, organs, protocol):
    """Rows (dicts, ``CSV_COLUMNS`` but case and resampling) of a label and a prediction image on
    the label's grid; spacing from the label, arrays (z, y, x)."""
    spacing_mm = label.GetSpacing()[::-1]
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    label_array = sitk.GetArrayViewFromImage(label)
    prediction_array = sitk.GetArrayViewFromImage(prediction)
    rows = []
    for label_id, organ in organs.items():
        label_mask, prediction_mask = label_array == label_id, prediction_array == label_id
        tolerance_mm = protocol.tolerances_mm[organ]
        dsc, nsd = challenge_scores(label_mask, prediction_mask, spacing_mm, tolerance_mm,
                                    protocol.nsd_zero_below_dsc)
        label_voxels = int(np.count_nonzero(label_mask))
        prediction_voxels = int(np.count_nonzero(prediction_mask))
        rows.append({"organ": organ, "label_id": label_id, "dsc": dsc, "nsd": nsd,
                     "nsd_tolerance_mm": tolerance_mm, "label_voxels": label_voxels,
                     "prediction_voxels": prediction_voxels,
                     "label_volume_ml": label_voxels * voxel_ml,
                     "prediction_volume_ml": prediction_voxels * voxel_ml})
    return rows


def score_case(case, prediction_path, label_path, organs, protocol, resample=False):
    """Rows of one case (see ``CSV_COLUMNS``); CaseError when it cannot be scored."""
    label = read_image(label_path, "label")
    prediction = read_image(prediction_path, "prediction")
    prediction, resampled = prediction_on_label_grid(prediction, label, prediction_path,
                                                     label_path, resample)
    return [{"case": case, **row, "prediction_resampled": resampled}
            for row in score_images(label, prediction, organs, protocol)]


def _score_job(job):
    """The per-case boundary: (case, rows, None) or (case, None, error message)."""
    case, prediction_paths, label_paths, organs, protocol, resample = job
    try:
        if len(prediction_paths) > 1:
            raise CaseError(f"several predictions for case {case}: "
                            + ", ".join(str(p) for p in prediction_paths))
        if not label_paths:
            raise CaseError(f"no label for prediction {prediction_paths[0]} "
                            f"(expected {case}.nii.gz in the labels folder)")
        if len(label_paths) > 1:
            raise CaseError(f"several labels for case {case}: "
                            + ", ".join(str(p) for p in label_paths))
        return case, score_case(case, prediction_paths[0], label_paths[0], organs, protocol,
                                resample), None
    except CaseError as error:
        return case, None, str(error)
    except Exception as error:
        return case, None, f"{type(error).__name__} while scoring {prediction_paths[0]}: {error}"


def report(message):
    """One line on stderr that does not break a running progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def run_jobs(function, jobs, workers, description, progress):
    """Results ``(case, payload, error)`` of ``function(job)`` for each job (``job[0]`` is the
    case), in completion order, with a progress bar; ``workers`` > 1 runs them in that many
    processes."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=description, unit="case", disable=not progress,
               file=sys.stderr)
    with bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield function(job)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = {pool.submit(function, job): job for job in jobs}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as error:
                    yield futures[future][0], None, f"worker process failed: {error!r}"
                bar.update()


# --- Summary and output ---------------------------------------------------------------------------

def summarise(rows, organs, protocol):
    """Per organ: number of cases and mean, std (population, ddof=0) and median of DSC and NSD."""
    per_organ = {}
    for organ in organs.values():
        scores = [row for row in rows if row["organ"] == organ]
        per_organ[organ] = {"cases": len(scores), "nsd_tolerance_mm": protocol.tolerances_mm[organ]}
        for metric in ("dsc", "nsd"):
            values = np.array([row[metric] for row in scores], dtype=float)
            per_organ[organ][metric] = ({"mean": float(values.mean()),
                                         "std": float(values.std()),
                                         "median": float(np.median(values))}
                                        if len(values) else None)
    return {"protocol": protocol.name, "nsd_zero_below_dsc": protocol.nsd_zero_below_dsc,
            "cases": len({row["case"] for row in rows}), "organs": per_organ}


def summary_markdown(evaluation):
    """The summary as a Markdown table in percent (as the paper's Table 5), plus problems."""
    summary = evaluation.summary
    rule = ", NSD = 0 where DSC < 0.2" if summary["nsd_zero_below_dsc"] is not None else ""
    lines = [f"## Evaluation: {summary['cases']} cases, protocol {summary['protocol']}{rule}", "",
             "| organ | cases | DSC (%) mean ± std | DSC (%) median | NSD (%) mean ± std "
             "| NSD (%) median | NSD tolerance |",
             "|---|---|---|---|---|---|---|"]
    for organ, scores in summary["organs"].items():
        cells = []
        for metric in ("dsc", "nsd"):
            values = scores[metric]
            cells += ([f"{100 * values['mean']:.2f} ± {100 * values['std']:.2f}",
                       f"{100 * values['median']:.2f}"] if values else ["-", "-"])
        lines.append(f"| {organ} | {scores['cases']} | {' | '.join(cells)} "
                     f"| {scores['nsd_tolerance_mm']:g} mm |")
    if evaluation.partial_cases:
        lines += ["", f"Partly labelled ({evaluation.labelled}): "
                      f"{len(evaluation.partial_cases)} cases are scored on the organs their "
                      "labels cover, so each organ's mean is over the cases that cover it "
                      "(column cases): "
                      + ", ".join(f"{case} ({', '.join(organs) or 'none'})"
                                  for case, organs in evaluation.partial_cases.items()) + "."]
    if evaluation.resampled:
        lines += ["", f"Resampled onto the label grid (nearest neighbour): "
                      f"{len(evaluation.resampled)} predictions: "
                      f"{', '.join(evaluation.resampled)}."]
    if evaluation.labels_without_prediction:
        lines += ["", "Not scored, no prediction: "
                      f"{len(evaluation.labels_without_prediction)} labels: "
                      f"{', '.join(evaluation.labels_without_prediction)}."]
    if evaluation.failures:
        lines += ["", f"Failed: {len(evaluation.failures)} cases:"]
        lines += [f"- {case}: {message}" for case, message in sorted(evaluation.failures.items())]
    return "\n".join(lines) + "\n"


def write_atomically(path, text):
    """Write text to ``path`` via a temporary name in the same folder and a rename."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def csv_text(rows):
    """Rows as CSV text with ``CSV_COLUMNS`` (floats with full precision)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary_json(evaluation):
    """The summary, problems and output paths as JSON text."""
    document = {**evaluation.summary, "failures": evaluation.failures,
                "labels_without_prediction": evaluation.labels_without_prediction,
                "resampled_cases": evaluation.resampled,
                "labelled": str(evaluation.labelled) if evaluation.labelled else None,
                "partial_cases": evaluation.partial_cases,
                "outputs": {key: str(value) for key, value in evaluation.outputs.items()}}
    return json.dumps(document, indent=2) + "\n"


# --- Previews -------------------------------------------------------------------------------------

def _preview_job(job):
    """Write one preview PNG: (case, path, None) or (case, None, error message)."""
    case, prediction_path, label_path, image_path, png_path, organs, resample, title = job
    try:
        from evaluation.previews import write_preview

        label = read_image(label_path, "label")
        prediction, _ = prediction_on_label_grid(read_image(prediction_path, "prediction"), label,
                                                 prediction_path, label_path, resample)
        image = read_image(image_path, "image") if image_path is not None else None
        return case, write_preview(png_path, label, prediction, organs, image, title), None
    except CaseError as error:
        return case, None, str(error)
    except Exception as error:
        return case, None, f"{type(error).__name__} while drawing {png_path}: {error}"


def worst_cases(rows, count=None):
    """Case names ordered by mean DSC over organs, worst first; the first ``count`` of them."""
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row["dsc"])
    ordered = sorted(by_case, key=lambda case: (np.mean(by_case[case]), case))
    return ordered if count is None else ordered[:count]


def preview_title(case, rows):
    """Figure title: case name and DSC / NSD per organ."""
    scores = ", ".join(f"{row['organ']} {row['dsc']:.3f} / {row['nsd']:.3f}"
                       for row in rows if row["case"] == case)
    return f"{case}    DSC / NSD: {scores}"


# --- The folder -----------------------------------------------------------------------------------

def evaluate_folder(pred_dir, labels_dir, out=None, organs=None, protocol="flare21",
                    tolerance_mm=None, workers=DEFAULT_WORKERS, resample=False, previews_dir=None,
                    previews_worst=None, images_dir=None, progress=True, labelled="find"):
    """Score every prediction in ``pred_dir`` against its label in ``labels_dir``.

    Writes ``out`` (CSV; default ``pred_dir/evaluation.csv``) and the summary next to it (same
    name, ``.md`` and ``.json``), each atomically. ``organs``: label id -> organ name (default
    1 liver, 2 kidney, 3 spleen, 4 pancreas). ``protocol``: "flare21" (NSD at 1 mm) or "flare22"
    (per-organ tolerances, NSD = 0 where DSC < 0.2); ``tolerance_mm`` overrides the tolerances.
    ``resample``: predictions on another grid are resampled (nearest neighbour) instead of failing.
    ``previews_dir``: a PNG per case (the ``previews_worst`` worst by mean DSC, or all), with the
    CT from ``images_dir`` when given. ``labelled``: the declaration of which organs each label
    covers (a labelled.json or dataset.json path), "find" (default) to look for one beside the
    labels (``find_declaration``), or None for none; each case is scored on its covered organs
    only. ``workers``: processes (default: CPUs, at most 8). Cases that fail are in
    ``Evaluation.failures``; raises ValueError only when nothing can be scored at all (missing
    folders, no predictions, options, a bad declaration).
    """
    organs = dict(organs or method.LABELS)
    rules = make_protocol(protocol, organs, tolerance_mm)
    for role, folder in (("predictions", pred_dir), ("labels", labels_dir), ("images", images_dir)):
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"the {role} folder {folder} does not exist")
    predictions, labels = files_by_case(pred_dir), files_by_case(labels_dir)
    if not predictions:
        raise ValueError(f"no predictions (NAME.nii.gz) in {pred_dir}")
    out = Path(out) if out is not None else Path(pred_dir) / DEFAULT_OUT_NAME
    if out.suffix.lower() != ".csv":
        raise ValueError(f"the output {out} must end in .csv (the summary goes next to it as "
                         ".md and .json)")
    if labelled == "find":
        labelled = find_declaration(labels_dir)
    elif labelled is not None and not Path(labelled).is_file():
        raise ValueError(f"the declaration {labelled} does not exist")
    case_organs = organs_by_case(predictions, organs, labelled)
    out.parent.mkdir(parents=True, exist_ok=True)

    jobs = [(case, paths, labels.get(case, []), case_organs[case], rules, resample)
            for case, paths in sorted(predictions.items())]
    rows, failures, resampled = [], {}, []
    for case, case_rows, error in run_jobs(_score_job, jobs, workers, "scoring", progress):
        if error is not None:
            failures[case] = error
            report(f"error: {case}: {error}")
            continue
        rows += case_rows
        if case_rows and case_rows[0]["prediction_resampled"]:
            resampled.append(case)
            report(f"note: {case}: prediction resampled onto the label grid (nearest neighbour)")
    order = {organ: index for index, organ in enumerate(organs.values())}
    rows.sort(key=lambda row: (row["case"], order[row["organ"]]))
    evaluation = Evaluation(rows, summarise(rows, organs, rules), failures,
                            sorted(set(labels) - set(predictions)), sorted(resampled))
    evaluation.labelled = Path(labelled) if labelled is not None else None
    evaluation.partial_cases = {case: list(covered.values()) for case, covered
                                in sorted(case_organs.items()) if len(covered) < len(organs)}
    evaluation.outputs = {"csv": out, "markdown": out.with_suffix(".md"),
                          "json": out.with_suffix(".json")}
    if previews_dir is not None and rows:
        evaluation.outputs["previews"] = Path(previews_dir)
        write_previews(evaluation, predictions, labels, images_dir, Path(previews_dir), organs,
                       resample, previews_worst, workers, progress)
    write_atomically(out, csv_text(rows))
    write_atomically(evaluation.outputs["markdown"], summary_markdown(evaluation))
    write_atomically(evaluation.outputs["json"], summary_json(evaluation))
    return evaluation


def write_previews(evaluation, predictions, labels, images_dir, previews_dir, organs, resample,
                   count, workers, progress):
    """Preview PNGs ``previews_dir/CASE.png`` of the ``count`` worst scored cases (or all); a
    preview that fails is reported on stderr and in ``evaluation.failures`` as
    ``CASE (preview)``."""
    previews_dir.mkdir(parents=True, exist_ok=True)
    images = files_by_case(images_dir, prefer_image_naming=True) if images_dir is not None else {}
    jobs = [(case, predictions[case][0], labels[case][0], (images.get(case) or [None])[0],
             previews_dir / f"{case}.png", organs, resample, preview_title(case, evaluation.rows))
            for case in worst_cases(evaluation.rows, count)]
    for case, _, error in run_jobs(_preview_job, jobs, workers, "previews", progress):
        if error is not None:
            evaluation.failures[f"{case} (preview)"] = error
            report(f"error: {case}: preview: {error}")


# --- Command line ---------------------------------------------------------------------------------

def organs_option(text):
    """argparse type for --organs."""
    try:
        return parse_organs(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluation.evaluate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    parser.add_argument("--labels", required=True, type=Path, help="folder of reference labels")
    parser.add_argument("--out", type=Path, help=f"CSV to write (default PRED/{DEFAULT_OUT_NAME}); "
                        "the summary goes next to it as .md and .json")
    parser.add_argument("--organs", type=organs_option, default=dict(method.LABELS),
                        help="label ids and names, e.g. 1:liver,2:kidney,3:spleen,4:pancreas "
                             "(default)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="flare21",
                        help="flare21: NSD at 1 mm; flare22: liver 5, kidney 3, spleen 3, pancreas "
                             "5 mm and NSD = 0 where DSC < 0.2")
    parser.add_argument("--tolerance-mm", type=float, help="NSD tolerance for every organ (mm)")
    parser.add_argument("--labelled", type=Path, default=None,
                        help="labelled.json or dataset.json declaring which organs each label "
                             "covers (default: one found in the labels folder or above it); "
                             "cases are scored on covered organs only")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="cases scored in parallel processes (default: CPUs, at most 8)")
    parser.add_argument("--resample", action="store_true",
                        help="resample predictions on another grid onto the label grid "
                             "(nearest neighbour) instead of reporting an error")
    parser.add_argument("--previews", type=Path, help="folder for a preview PNG per case")
    parser.add_argument("--previews-worst", type=int, metavar="N",
                        help="previews of the N worst cases by mean DSC only")
    parser.add_argument("--images", type=Path,
                        help="folder of the CT images (NAME_0000.nii.gz) shown in the previews")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.previews_worst is not None and args.previews is None:
        parser.error("--previews-worst needs --previews DIR")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        evaluation = evaluate_folder(args.pred, args.labels, args.out, args.organs, args.protocol,
                                     args.tolerance_mm, args.workers, args.resample, args.previews,
                                     args.previews_worst, args.images, progress=not args.quiet,
                                     labelled=args.labelled or "find")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_markdown(evaluation))
    print("wrote " + ", ".join(str(path) for path in evaluation.outputs.values()))
    return 1 if evaluation.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
