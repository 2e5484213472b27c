"""The cohort command (cohort/) on a real Ray cluster that the tests start: a head node and a
second worker node, each its own `ray start` process group on a loopback address, one CPU each.
Generated cases, a PACS-style DICOM tree and the real DICOM series; faults are real (SIGKILL of
a worker process and of the driver)."""

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk

from app import dicom_seg
from app import io as image_io
from app.cli import main as folder_main
from app.cli import organ_volumes_ml
from cohort import worker
from cohort.discover import HeaderCache, discover, read_headers
from synthetic import CaseGeometry, generate_case
from tests.conftest import ROOT
from tests.dicom_files import ENHANCED_CT_IMAGE, write_ct_series, write_dose_report

RAY = Path(sys.executable).parent / "ray"
# loopback addresses: not 127.0.0.1 (Ray rewrites it), not 127.0.0.2 (what --ray local uses)
HEAD_IP, WORKER_IP = "127.0.0.3", "127.0.0.4"
NODE_MEMORY = "--object-store-memory=100000000"  # 100 MB: cases never travel through it


def small_case(seed, size=(64, 64, 12), spacing=(6.0, 6.0, 5.0)):
    """A generated abdomen on a coarse grid (about a second to segment)."""
    geometry = CaseGeometry(size, spacing, (-190.0, -200.0, -330.0))
    return generate_case(seed, geometry=geometry)[0]


def free_port(host):
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def ray_environment():
    token = secrets.token_hex(16)
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            "RAY_USAGE_STATS_ENABLED": "0", "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(ROOT)}


def stop_group(process, grace_seconds=5.0):
    """End a `ray start --block` process and everything it started (its process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # raylet, GCS and workers left behind
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """(address, environment) of a two-node Ray cluster; stopped after the module's tests, even
    when they fail."""
    environment = ray_environment()
    port = free_port(HEAD_IP)
    logs = tmp_path_factory.mktemp("ray")
    common = ["--num-cpus=1", NODE_MEMORY, "--disable-usage-stats", "--block"]
    nodes = []

    def start(name, *arguments):
        with open(logs / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            nodes.append(subprocess.Popen([str(RAY), "start", *arguments, *common],
                                          env=environment, start_new_session=True, stdout=log,
                                          stderr=subprocess.STDOUT))

    try:
        start("head", "--head", f"--port={port}", f"--node-ip-address={HEAD_IP}",
              "--include-dashboard=false")
        address = f"{HEAD_IP}:{port}"
        wait_for_nodes(address, environment, 1, nodes)
        start("worker", f"--address={address}", f"--node-ip-address={WORKER_IP}")
        wait_for_nodes(address, environment, 2, nodes)
        yield address, environment
    finally:
        for node in reversed(nodes):
            stop_group(node)


def wait_for_nodes(address, environment, count, nodes, timeout_seconds=90):
    """Wait until the cluster reports ``count`` live nodes."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            raise RuntimeError("a `ray start` process ended early (see its log)")
        status = subprocess.run([str(RAY), "status", f"--address={address}"], env=environment,
                                capture_output=True, text=True)
        if status.returncode == 0 and status.stdout.count("node_") >= count:
            return
        time.sleep(1)
    raise TimeoutError(f"the Ray cluster did not reach {count} nodes")


def cohort_command(input_dir, output_dir, address, *options):
    return [sys.executable, "-m", "cohort", "run", str(input_dir), str(output_dir), "--ray",
            address, *options]


def manifest_rows(output_dir):
    with sqlite3.connect(output_dir / "manifest.sqlite") as connection:
        rows = connection.execute("SELECT name, status, attempts, error, outputs FROM cases")
        return {name: {"status": status, "attempts": attempts, "error": error,
                       "outputs": json.loads(outputs)}
                for name, status, attempts, error, outputs in rows}


def log_lines(output_dir, name):
    path = output_dir / "logs" / f"{name}.log"
    return path.read_text().splitlines() if path.exists() else []


def partials(folder):
    return sorted(p.name for p in Path(folder).rglob("*") if ".partial-" in p.name)


def same_labels(a, b):
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
            and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)))


# ---------------------------------------------------------------------------------------------
# Discovery (no Ray)
# ---------------------------------------------------------------------------------------------


def pacs_tree(root):
    """A study as a PACS exports it: two CT series and a localizer mixed in one folder, an MR
    series, enhanced CT, a dose report, nested FLARE files with a label folder, a text file and
    a broken DICOM file."""
    study = "1.2.826.0.1.3680043.2.1125.9"
    image = small_case(5)
    mixed = root / "export" / "PAT1" / "ST1"
    write_ct_series(image, mixed, series_uid=f"{study}.1", study_uid=study, prefix="A")
    write_ct_series(image[:, :, 2:], mixed, series_uid=f"{study}.2", study_uid=study,
                    prefix="B", description="abdomen 5.0", file_order=range(9, -1, -1))
    write_ct_series(image[:, :, :1], mixed, series_uid=f"{study}.3", study_uid=study,
                    prefix="L", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_ct_series(image, root / "export" / "PAT1" / "ST2", series_uid=f"{study}.4",
                    study_uid=study, modality="MR")
    write_dose_report(root / "export" / "PAT1" / "ST1" / "DOSE", study)
    write_ct_series(image[:, :, :2], root / "export" / "PAT1" / "ST3", series_uid=f"{study}.5",
                    study_uid=study, prefix="E", sop_class=ENHANCED_CT_IMAGE)
    (root / "export" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (root / "flare" / "deep").mkdir(parents=True)
    sitk.WriteImage(image, str(root / "flare" / "deep" / "liver_7_0000.nii.gz"))
    (root / "flare" / "labelsTr").mkdir()
    sitk.WriteImage(image, str(root / "flare" / "labelsTr" / "liver_7.nii.gz"))
    sitk.WriteImage(image, str(root / "top_0000.nii.gz"))
    (root / "notes.txt").write_text("not an image")
    return image


def test_discovery_finds_one_case_per_ct_series_and_lists_everything_else(tmp_path):
    image = pacs_tree(tmp_path)
    cases, skipped = discover(tmp_path)
    assert [(c.name, c.format, len(c.files)) for c in cases] == [
        ("P1_1_1", "dicom", 12), ("P1_1_2", "dicom", 10),
        ("flare__deep__liver_7", "nii.gz", 0), ("top", "nii.gz", 0)]
    assert cases[0].identity == "dicom:1.2.826.0.1.3680043.2.1125.9.1"
    assert cases[1].header["SeriesDescription"] == "abdomen 5.0"
    assert cases[2].identity.startswith(f"file:{tmp_path / 'flare' / 'deep'}")
    reasons = {p.path.name: p.reason for p in skipped}
    assert reasons["L00000"] == "a localizer (scout) image, not a volume"
    assert reasons["DOSE"] == "a dose report (X-Ray Radiation Dose SR Storage)"
    assert reasons["IM00000"] == "modality MR, not CT (MR Image Storage)"
    assert reasons["broken.dcm"].startswith("not a readable DICOM file")
    assert reasons["notes.txt"].startswith("not an image")
    assert reasons["liver_7.nii.gz"].startswith("in a label folder")
    assert reasons["E00000"].startswith("an Enhanced (multi-frame) CT object: not read")
    # a series that shares its folder is read from its own files, in slice order
    first, _ = worker.read(cases[0])
    second, _ = worker.read(cases[1])  # its files were numbered feet first
    assert np.array_equal(sitk.GetArrayViewFromImage(first), sitk.GetArrayViewFromImage(image))
    assert np.array_equal(sitk.GetArrayViewFromImage(second),
                          sitk.GetArrayViewFromImage(image[:, :, 2:]))
    assert np.allclose(second.GetOrigin(), image[:, :, 2:].GetOrigin(), atol=1e-4)


def test_dicom_headers_are_read_once_per_file_version_and_alike_in_a_process_pool(tmp_path):
    pacs_tree(tmp_path / "archive")
    cache = HeaderCache(tmp_path / "discovery.sqlite")
    first = discover(tmp_path / "archive", cache)
    dicom_files = [p for p in (tmp_path / "archive").rglob("*")
                   if p.is_file() and not p.name.endswith((".nii.gz", ".txt"))]
    assert cache.hits == 0
    assert discover(tmp_path / "archive", cache) == first  # every header from the cache
    assert cache.hits == len(dicom_files) == 39  # 12 + 10 CT, scout, 12 MR, 2 enhanced, SR, junk
    changed = tmp_path / "archive" / "export" / "PAT1" / "ST1" / "A00000"
    os.utime(changed, ns=(1, 1))  # another version of that file: read again
    cache.hits = 0
    assert discover(tmp_path / "archive", cache) == first and cache.hits == 38
    cache.close()
    serial = read_headers(dicom_files)
    assert read_headers(dicom_files, processes=2, parallel_from=1) == serial
    assert serial[changed][0]["SeriesInstanceUID"] == "1.2.826.0.1.3680043.2.1125.9.1"


def test_the_command_refuses_before_any_work(tmp_path, capsys):
    from cohort.__main__ import main

    assert main(["run", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "missing: input folder does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    assert main(["run", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "skipped: " in err and "error: " in err and "no case found" in err
    sitk.WriteImage(small_case(1), str(tmp_path / "empty" / "a_0000.nii.gz"))
    assert main(["run", str(tmp_path / "empty"), str(tmp_path / "out"), "--weights",
                 str(tmp_path)]) == 2
    assert "localization.weights.h5: weights file missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "a", "b", "--workers", "0"])


# ---------------------------------------------------------------------------------------------
# On the cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_case_is_done_once_and_equals_the_folder_command(tmp_path, ray_cluster, predictor,
                                                               shared_data, monkeypatch):
    address, environment = ray_cluster
    inputs, output = tmp_path / "in", tmp_path / "out"
    for seed in (1, 2):
        (inputs / "site_a").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(small_case(seed), str(inputs / "site_a" / f"c{seed}_0000.nii.gz"))
    series = inputs / "pacs" / "PAT9" / "CT"
    write_ct_series(small_case(3), series, series_uid="1.2.3.9.1", study_uid="1.2.3.9",
                    patient_id="PAT9")
    write_dose_report(inputs / "pacs" / "PAT9" / "SR" / "dose", "1.2.3.9", "PAT9")
    (inputs / "pacs" / "real").mkdir()
    (inputs / "pacs" / "real" / "ts").symlink_to(shared_data / "dicom" / "ts_dicom_slices")
    (inputs / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 broken gzip")

    # the driver in this process: our warnings policy (pyproject.toml) applies to Ray's calls
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_USAGE_STATS_ENABLED"):
        monkeypatch.setenv(key, environment[key])
    from cohort.run import run

    rows, kept, skipped = run(inputs, output, address, output_format="both")
    assert kept == [] and [s.path.name for s in skipped] == ["dose"]
    status = {row["name"]: row for row in rows}
    names = ["PAT9_1_1", "corrupt", "pacs__real__ts", "site_a__c1", "site_a__c2"]
    assert sorted(status) == names
    assert status["corrupt"]["status"] == "failed"
    assert status["corrupt"]["error"].startswith(f"{inputs / 'corrupt_0000.nii.gz'}: truncated")
    for name in names:  # each case started exactly once, done (or failed) once
        lines = log_lines(output, name)
        assert sum(" started " in line for line in lines) == 1, (name, lines)
        assert status[name]["attempts"] == 1
    assert {row["record"]["node"] for row in rows} == {HEAD_IP, WORKER_IP}  # both nodes worked
    assert partials(output) == []

    # the folder command on the same inputs, laid out flat as it wants them
    flat, folder_out = tmp_path / "flat", tmp_path / "folder_out"
    flat.mkdir()
    for seed in (1, 2):
        (flat / f"c{seed}_0000.nii.gz").symlink_to(inputs / "site_a" / f"c{seed}_0000.nii.gz")
    (flat / "ct9").symlink_to(series)
    (flat / "ts").symlink_to(shared_data / "dicom" / "ts_dicom_slices")
    assert folder_main([str(flat), str(folder_out), "--quiet"], predictor=predictor) == 0
    pairs = {"site_a__c1": "c1", "site_a__c2": "c2", "PAT9_1_1": "ct9", "pacs__real__ts": "ts"}
    for name, folder_name in pairs.items():
        ours = sitk.ReadImage(str(output / "labels" / f"{name}.nii.gz"))
        theirs = sitk.ReadImage(str(folder_out / f"{folder_name}.nii.gz"))
        assert same_labels(ours, theirs), name
        assert status[name]["record"]["volumes_ml"] == organ_volumes_ml(theirs)
    # DICOM series also got a SEG holding the same labels; image files did not
    for name in ("PAT9_1_1", "pacs__real__ts"):
        files = image_io.dicom_series_files(series if name == "PAT9_1_1" else
                                            shared_data / "dicom" / "ts_dicom_slices")
        labels = sitk.ReadImage(str(output / "labels" / f"{name}.nii.gz"))
        assert dicom_seg.existing_seg_problem(output / "labels" / f"{name}.dcm", files,
                                              labels) is None
    assert not (output / "labels" / "site_a__c1.dcm").exists()

    # the cohort table
    table = pq.read_table(output / "cohort.parquet").to_pylist()
    by_case = {row["case"]: row for row in table}
    assert sorted(by_case) == names
    assert by_case["PAT9_1_1"]["series_description"] == "abdomen 3.0"
    assert by_case["PAT9_1_1"]["slice_thickness_mm"] == 5.0
    assert by_case["pacs__real__ts"]["manufacturer"] == "SIEMENS"
    assert by_case["site_a__c1"]["liver_ml"] == status["site_a__c1"]["record"]["volumes_ml"][
        "liver"]
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "labels" / "site_a__c1.nii.gz")))
    hu = sitk.GetArrayFromImage(small_case(1))[liver == 1]
    assert by_case["site_a__c1"]["liver_hu_median"] == pytest.approx(np.median(hu), abs=0.05)
    assert by_case["corrupt"]["error"] and by_case["corrupt"]["liver_ml"] is None
    assert (output / "cohort.csv").read_text().count("\n") == len(names) + 1
    assert (output / "cohort.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun keeps every output that verifies; an output broken since, and the failed case,
    # are segmented again
    broken = output / "labels" / "site_a__c2.nii.gz"
    broken.write_bytes(broken.read_bytes()[:-40])
    rerun = subprocess.run(cohort_command(inputs, output, address, "--output-format", "both"),
                           env=environment, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr
    assert "site_a__c2: segmented again: site_a__c2.nii.gz: unreadable" in rerun.stderr
    assert "5 cases (3 done before, kept), 2 to segment" in rerun.stderr
    assert "summary: 4 done (3 kept from earlier runs), 1 failed" in rerun.stderr
    assert sum(" started " in line for line in log_lines(output, "site_a__c1")) == 1
    assert sum(" started " in line for line in log_lines(output, "site_a__c2")) == 2
    assert same_labels(sitk.ReadImage(str(broken)),
                       sitk.ReadImage(str(folder_out / "c2.nii.gz")))


def write_cases(inputs, count, seed=10):
    inputs.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        sitk.WriteImage(small_case(seed + index, size=(80, 80, 16)),
                        str(inputs / f"k{index:02d}_0000.nii.gz"))


def wait_for(predicate, timeout_seconds, what):
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(what)


def running_cases(output):
    """[(case, worker pid)] of the cases whose latest attempt has started and not ended."""
    running = []
    for log in sorted((output / "logs").glob("*.log")) if (output / "logs").exists() else []:
        lines = log.read_text().splitlines()
        if lines and " started " in lines[-1]:
            running.append((log.stem, int(lines[-1].split("pid=")[1].split()[0])))
    return running


@pytest.mark.slow
def test_killed_workers_cost_only_their_case_retried_up_to_a_limit(tmp_path, ray_cluster):
    """One case's worker is killed once (the retry finishes it), another's at every attempt
    (failed after MAX_ATTEMPTS, with the reason); the rest are done once each."""
    from cohort.run import MAX_ATTEMPTS

    address, environment = ray_cluster
    inputs, output = tmp_path / "in", tmp_path / "out"
    write_cases(inputs, 6)
    driver = subprocess.Popen(cohort_command(inputs, output, address), env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, poison, killed = None, None, set()
    try:
        deadline = time.monotonic() + 400
        while driver.poll() is None and time.monotonic() < deadline:
            for case, pid in running_cases(output):
                if (case, pid) in killed:
                    continue
                if victim is None:
                    victim = case
                elif poison is None and case != victim:
                    poison = case
                if case == poison or (case == victim and not any(
                        name == victim for name, _ in killed)):
                    os.kill(pid, signal.SIGKILL)  # in the middle of the case
                    killed.add((case, pid))
            time.sleep(0.02)
        stdout, stderr = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 1, stderr  # the poisoned case failed
    rows = manifest_rows(output)
    assert sorted(rows) == [f"k{i:02d}" for i in range(6)]
    starts = {name: sum(" started " in line for line in log_lines(output, name)) for name in rows}
    assert rows[victim]["status"] == "done" and starts[victim] == rows[victim]["attempts"] == 2
    assert rows[poison]["status"] == "failed"
    assert starts[poison] == rows[poison]["attempts"] == MAX_ATTEMPTS
    assert f"its worker died {MAX_ATTEMPTS} time(s) while segmenting it" in rows[poison]["error"]
    assert all(row["status"] == "done" and starts[name] == 1 for name, row in rows.items()
               if name not in (victim, poison)), rows
    assert f"{victim}: done" in stdout and "(attempt 2)" in stdout
    assert f"failed: {poison}: " in stderr
    assert partials(output) == []
    for name in rows:  # every output whole and on its input's grid; none for the failed case
        case = image_io.Case(name, inputs / f"{name}_0000.nii.gz", "nii.gz")
        problem = image_io.existing_output_problem(case, output / "labels" / f"{name}.nii.gz")
        assert (problem is None) == (name != poison), (name, problem)


@pytest.mark.slow
def test_a_killed_driver_is_resumed_by_a_rerun(tmp_path, ray_cluster):
    address, environment = ray_cluster
    inputs, output = tmp_path / "in", tmp_path / "out"
    write_cases(inputs, 6, seed=30)
    driver = subprocess.Popen(cohort_command(inputs, output, address), env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        def two_done():
            if not (output / "manifest.sqlite").exists():
                return False
            try:
                return sum(r["status"] == "done" for r in manifest_rows(output).values()) >= 2
            except sqlite3.OperationalError:  # the table is being created
                return False
        wait_for(two_done, 300, "no two cases done")
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    done_first = {name for name, row in manifest_rows(output).items() if row["status"] == "done"}
    assert 2 <= len(done_first) < 6
    rerun = subprocess.run(cohort_command(inputs, output, address), env=environment,
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr
    assert f"6 cases ({len(done_first)} done before, kept)" in rerun.stderr
    rows = manifest_rows(output)
    assert all(row["status"] == "done" for row in rows.values())
    for name in done_first:  # not started again
        assert sum(" started " in line for line in log_lines(output, name)) == 1
    assert partials(output) == []  # the killed run's temporary files are gone


@pytest.mark.slow
def test_a_local_cluster_writes_dicom_seg_for_series_and_fails_other_cases(tmp_path):
    """--ray local starts its own one-CPU cluster (never one found on the machine);
    --output-format dicom-seg: a SEG for the series, the image file fails with the reason."""
    inputs, output = tmp_path / "in", tmp_path / "out"
    series = inputs / "PAT3" / "CT"
    files = write_ct_series(small_case(4), series, series_uid="1.2.3.7.1", study_uid="1.2.3.7",
                            patient_id="PAT3")
    sitk.WriteImage(small_case(6), str(inputs / "plain_0000.nii.gz"))
    (output / "labels").mkdir(parents=True)
    stale = output / "labels" / ".partial-999999-0123abcd.dcm"  # of a process long gone
    stale.write_bytes(b"half")
    environment = {**ray_environment(), "RAY_ADDRESS": "127.0.0.1:1"}  # not to be joined
    del environment["RAY_AUTH_TOKEN"]  # a local cluster makes its own
    completed = subprocess.run(
        cohort_command(inputs, output, "local", "--local-cpus", "1", "--output-format",
                       "dicom-seg"), env=environment, capture_output=True, text=True,
        timeout=300)
    assert completed.returncode == 1, completed.stderr
    assert "removed 1 temporary file(s) of an interrupted run" in completed.stderr
    rows = manifest_rows(output)
    assert rows["PAT3_1_1"]["status"] == "done"
    assert rows["PAT3_1_1"]["outputs"] == {"dicom-seg": str(output / "labels" / "PAT3_1_1.dcm")}
    assert rows["plain"]["status"] == "failed"
    assert "--output-format dicom-seg needs a DICOM series input" in rows["plain"]["error"]
    assert sorted(p.name for p in (output / "labels").iterdir()) == ["PAT3_1_1.dcm"]
    image, _ = image_io.read_dicom_series(series)
    import highdicom as hd

    datasets, _ = dicom_seg.source_datasets(files)
    labels = dicom_seg.labels_from_seg(hd.seg.segread(output / "labels" / "PAT3_1_1.dcm"),
                                       datasets, image)
    with sqlite3.connect(output / "manifest.sqlite") as connection:
        record = json.loads(connection.execute(
            "SELECT record FROM cases WHERE name = 'PAT3_1_1'").fetchone()[0])
    assert record["volumes_ml"]["liver"] == pytest.approx(
        np.count_nonzero(labels == 1) * np.prod(image.GetSpacing()) / 1000, abs=0.01)
