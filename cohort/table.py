"""The cohort table: one row per case from the manifest, as OUTPUT/cohort.csv and
OUTPUT/cohort.parquet (pyarrow), and OUTPUT/cohort.png (organ-volume histograms, throughput).

Columns: case, status, attempts, identity, input; DICOM ids and scanner (patient, study, series,
series number and description, manufacturer, model, study date), slice thickness (mm, DICOM) and
contrast agent (DICOM's ContrastBolusAgent); size and spacing; ROI extent (mm); organ volumes
(mL), mean and median HU per organ; seconds per stage; peak memory (MB); host and Ray node;
warnings and error joined by " | "; finished (UTC, ISO 8601).
"""

import calendar
import csv
import os
import time
from pathlib import Path

from app import io as image_io
from app import method

DICOM_COLUMNS = {"patient_id": "PatientID", "study_uid": "StudyInstanceUID",
                 "series_uid": "SeriesInstanceUID", "series_number": "SeriesNumber",
                 "series_description": "SeriesDescription", "manufacturer": "Manufacturer",
                 "scanner_model": "ManufacturerModelName", "study_date": "StudyDate",
                 "slice_thickness_mm": "SliceThickness", "contrast_agent": "ContrastBolusAgent"}
STAGES = ("read", "read_wait", "orientation", "localization_preprocessing", "localization_warm_up",
          "localization_network", "segmentation_preprocessing", "segmentation_warm_up",
          "segmentation_network", "resampling_back", "write", "total")  # app/predictor.py's
FILES = ("cohort.csv", "cohort.parquet", "cohort.png")


def rows_of(entries, headers):
    """Flat table rows (dicts with the same keys, values str, int, float or None) from manifest
    entries and each case's DICOM header ({} for image files)."""
    rows = []
    for entry in entries:
        record, header = entry["record"], headers.get(entry["name"], {})
        row = {"case": entry["name"], "status": entry["status"], "attempts": entry["attempts"],
               "identity": entry["identity"], "input": entry["input"], "format": entry["format"]}
        for column, attribute in DICOM_COLUMNS.items():
            value = header.get(attribute)
            row[column] = str(value) if value is not None and column != "slice_thickness_mm" \
                else value
        row["size_xyz"] = "x".join(map(str, record.get("size_xyz", []))) or None
        row["spacing_mm_xyz"] = "x".join(f"{s:g}" for s in record.get("spacing_mm_xyz", [])) \
            or None
        extent = record.get("roi_mm", {}).get("extent_xyz")
        row["roi_extent_mm_xyz"] = "x".join(f"{e:.0f}" for e in extent) if extent else None
        for organ in method.LABELS.values():
            row[f"{organ}_ml"] = record.get("volumes_ml", {}).get(organ)
            row[f"{organ}_hu_mean"] = record.get("hu_mean", {}).get(organ)
            row[f"{organ}_hu_median"] = record.get("hu_median", {}).get(organ)
        seconds = record.get("seconds", {})
        for stage in STAGES:
            row[f"seconds_{stage}"] = seconds.get(stage)
        row["peak_memory_mb"] = record.get("peak_memory_mb")
        row["host"] = record.get("host")
        row["node"] = record.get("node")  # the Ray node's address
        row["warnings"] = " | ".join(record.get("warnings", [])) or None
        row["error"] = entry["error"]
        row["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["updated"])) \
            if entry["updated"] else None
        rows.append(row)
    return rows


def replace_atomically(path, write):
    """``write(temporary path)``, then rename over ``path``."""
    temporary = path.parent / f"{image_io.partial_name()}{path.suffix}"  # a rerun removes it
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write(entries, headers, output_dir):
    """Write the table files into ``output_dir``; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    output_dir = Path(output_dir)
    rows = rows_of(entries, headers)
    columns = list(rows[0]) if rows else ["case"]

    def write_csv(path):
        with open(path, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    schema = pa.schema([(c, pa.float64() if c.endswith(FLOAT_SUFFIXES) else
                         pa.int64() if c == "attempts" else pa.string()) for c in columns])
    replace_atomically(output_dir / FILES[0], write_csv)
    replace_atomically(output_dir / FILES[1], lambda path: pq.write_table(
        pa.Table.from_pylist(rows, schema=schema), path))
    replace_atomically(output_dir / FILES[2], lambda path: summary_png(rows, path))
    return [output_dir / name for name in FILES]


FLOAT_SUFFIXES = ("_ml", "_hu_mean", "_hu_median", "_mm", "peak_memory_mb",
                  *(f"seconds_{stage}" for stage in STAGES))


def summary_png(rows, path):
    """Organ-volume histograms of the done cases and cases finished over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in rows if row["status"] == "done"]
    figure, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    for axis, organ in zip(axes, method.LABELS.values()):
        volumes = [row[f"{organ}_ml"] for row in done if row[f"{organ}_ml"] is not None]
        axis.hist(volumes, bins=20, color="tab:blue")
        axis.set_title(f"{organ} ({len(volumes)} cases)")
        axis.set_xlabel("volume (mL)")
    axes[0].set_ylabel("cases")
    finished = sorted(calendar.timegm(time.strptime(row["finished_utc"], "%Y-%m-%dT%H:%M:%SZ"))
                      for row in done if row["finished_utc"])
    if finished:
        axes[4].plot([(t - finished[0]) / 60 for t in finished], range(1, len(finished) + 1),
                     drawstyle="steps-post")
    axes[4].set_title(f"throughput ({len(done)} done, {len(rows) - len(done)} not)")
    axes[4].set_xlabel("minutes since the first case")
    axes[4].set_ylabel("cases done")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=80)
    plt.close(figure)
