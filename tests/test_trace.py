"""evaluation.trace: the organisers' efficiency measurement, with real subprocesses.

Only NVML is faked (an object with pynvml's functions, in the GPU tests); processes, psutil and
files are real. Timing tolerances are generous because the machine may be busy with training.
"""

import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import SimpleITK as sitk

from evaluation import trace
from tests.conftest import ROOT

PYTHON = sys.executable
MIB = 2 ** 20


# ----- aggregation rules on known series ----------------------------------------------------

def test_flare21_max_is_the_largest_value_present_in_more_than_2_percent_of_samples():
    values = [1000.0] * 95 + [3000.0] * 3 + [5000.0] * 2  # n = 100: 3 % and exactly 2 %
    assert trace.flare21_max_gpu_mb(values) == 3000.0
    assert max(values) == 5000.0


def test_flare21_max_value_seen_in_exactly_2_percent_does_not_count():
    assert trace.flare21_max_gpu_mb([1000.0] * 98 + [5000.0] * 2) == 1000.0
    assert trace.flare21_max_gpu_mb([1000.0] * 97 + [5000.0] * 3) == 5000.0


def test_flare21_max_with_fewer_than_50_samples_is_the_plain_maximum():
    assert trace.flare21_max_gpu_mb([1000.0, 1000.0, 7000.0]) == 7000.0
    assert trace.flare21_max_gpu_mb([float(v) for v in range(49)]) == 48.0
    # 50 samples: a single spike is 2 % exactly and no longer counts
    assert trace.flare21_max_gpu_mb([1000.0] * 49 + [7000.0]) == 1000.0


def test_flare21_max_is_none_when_no_value_qualifies_or_no_samples():
    assert trace.flare21_max_gpu_mb([float(v) for v in range(50)]) is None
    assert trace.flare21_max_gpu_mb([]) is None
    assert trace.flare21_max_gpu_mb([None, float("nan")]) is None


def test_flare21_max_uses_exact_equality_and_drops_missing_readings():
    near = [1000.0] * 97 + [2000.0, 2000.5, 2000.25]  # close but distinct: no binning
    assert trace.flare21_max_gpu_mb(near) == 1000.0
    # 11 real readings (< 50): the spike counts; were the 60 missing ones counted, it would not
    assert trace.flare21_max_gpu_mb([None] * 60 + [1000.0] * 10 + [3000.0]) == 3000.0


def test_gpu_areas_on_uneven_intervals_match_hand_computation():
    times_s, memory_mb, end_s = [0.0, 0.1, 0.3, 0.6], [3000.0, 4048.0, 2048.0, 6048.0], 1.0
    # held: 3000 for 0.1 s, 4048 for 0.2 s, 2048 for 0.3 s, 6048 for 0.4 s
    assert trace.step_area(times_s, memory_mb, end_s) == pytest.approx(
        300.0 + 809.6 + 614.4 + 2419.2)
    # above 2048 MB only: 952*0.1 + 2000*0.2 + 0*0.3 + 4000*0.4
    assert trace.flare22_gpu_area_mb_s(times_s, memory_mb, end_s) == pytest.approx(2095.2)
    # memory below the allowance adds nothing (never a negative contribution)
    assert trace.flare22_gpu_area_mb_s([0.0, 1.0], [500.0, 3048.0], 2.0) == pytest.approx(1000.0)


def test_area_equals_the_organisers_sum_times_interval_on_a_regular_grid():
    rng = np.random.default_rng(0)
    memory_mb = list(rng.integers(0, 9000, size=40).astype(float))
    times_s = [0.1 * i for i in range(40)]
    assert trace.step_area(times_s, memory_mb, 4.0) == pytest.approx(sum(memory_mb) * 0.1)


def test_area_skips_missing_values_and_rejects_time_going_backwards():
    assert trace.step_area([0.0, 1.0, 3.0], [1000.0, None, 1000.0], 4.0) == pytest.approx(2000.0)
    assert trace.step_area([], [], 5.0) == 0.0
    with pytest.raises(ValueError):
        trace.step_area([0.0, 0.2, 0.1], [1.0, 1.0, 1.0], 1.0)
    with pytest.raises(ValueError):
        trace.step_area([0.0, 0.5], [1.0, 1.0], 0.4)


def test_cpu_area_uses_each_reading_over_the_interval_before_it():
    # readings at 0.1, 0.3, 0.6 s average the intervals (0, 0.1], (0.1, 0.3], (0.3, 0.6]
    assert trace.cpu_area_percent_s([0.1, 0.3, 0.6], [50.0, 100.0, 0.0]) == pytest.approx(25.0)
    assert trace.cpu_area_percent_s([0.1, 0.3, 0.6], [50.0, 100.0, 0.0], start_s=0.05) == \
        pytest.approx(22.5)


# ----- commands -----------------------------------------------------------------------------

def test_default_command_is_the_organisers_docker_line():
    command = trace.render_command(trace.organisers_command("TEAM"), inputs="/x/inputs",
                                   outputs="/x/outputs", name="case")
    assert command == ('docker container run --gpus="device=0" --name TEAM --rm '
                       '-v /x/inputs/:/workspace/inputs/ -v /x/outputs/:/workspace/outputs/ '
                       'TEAM:latest /bin/bash -c "sh predict.sh"')
    assert "--gpus=\"device=2\"" in trace.organisers_command("t", "registry/t:v1", gpu=2)
    assert "registry/t:v1 /bin/bash" in trace.organisers_command("t", "registry/t:v1", gpu=2)


def test_placeholders_are_shell_quoted_and_other_braces_left_alone():
    command = trace.render_command("awk '{print}' {inputs} ${HOME} {name}", inputs="/a b", name="c")
    assert command == "awk '{print}' '/a b' ${HOME} c"


def test_find_cases_selects_by_name_and_count(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}_0000.nii.gz").write_bytes(b"x")
    (tmp_path / "a.nii.gz").write_bytes(b"label, not an input")
    assert [p.name for p in trace.find_cases(tmp_path)] == [
        "a_0000.nii.gz", "b_0000.nii.gz", "c_0000.nii.gz"]
    assert [p.name for p in trace.find_cases(tmp_path, limit=2)] == [
        "a_0000.nii.gz", "b_0000.nii.gz"]
    assert [p.name for p in trace.find_cases(tmp_path, names=["c", "a"])] == [
        "c_0000.nii.gz", "a_0000.nii.gz"]
    with pytest.raises(FileNotFoundError, match="zz_0000.nii.gz"):
        trace.find_cases(tmp_path, names=["zz"])


# ----- real subprocesses --------------------------------------------------------------------

def tiny_image(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.full((4, 8, 8), -1000, dtype=np.int16))
    path = folder / f"{name}_0000.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def no_gpu():
    """A GPU reader that reports no GPU (NVML failing to start), for tests not about the GPU."""
    return trace.Gpu(0, nvml=FakeNvml(init_error="NVML Shared Library Not Found"))


STEPS_SCRIPT = textwrap.dedent("""
    import json, shutil, sys, time
    marks_path, output, step_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    marks = {}
    time.sleep(0.8)
    marks["first_start"] = time.time()
    first = b"\\x01" * (step_mb * 2 ** 20)      # written, so resident at once
    marks["first_done"] = time.time()
    time.sleep(1.2)
    marks["second_start"] = time.time()
    second = b"\\x02" * (step_mb * 2 ** 20)
    marks["second_done"] = time.time()
    time.sleep(1.2)
    marks["free_start"] = time.time()
    del first, second
    marks["free_done"] = time.time()
    time.sleep(1.0)
    open(output, "wb").write(b"done")
    marks["end"] = time.time()
    open(marks_path, "w").write(json.dumps(marks))
""")


def test_memory_steps_of_a_child_show_in_the_rss_trace_at_the_right_times(tmp_path):
    step_mb, tolerance_mb, lag_s = 150, 40, 0.5
    script, marks_path = tmp_path / "steps.py", tmp_path / "marks.json"
    script.write_text(STEPS_SCRIPT)
    image = tiny_image(tmp_path / "images", "steps")
    # the allocating process is a grandchild (sh -> launcher -> script): the whole tree counts
    launcher = '-c "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"'
    command = (f"{PYTHON} {launcher} {PYTHON} {script} {marks_path} "
               f"{{outputs}}/{{name}}.nii.gz {step_mb}; true")
    result, samples = trace.trace_case(image, command, tmp_path / "steps.log", no_gpu(),
                                       interval_s=0.1, timeout_s=60)
    assert result.status == "ok", (result.reason, (tmp_path / "steps.log").read_text())
    marks = json.loads(marks_path.read_text())
    stamps = np.array([s.unix_time_s for s in samples])
    rss = np.array([s.rss_tree_mb for s in samples])

    def during(start, end):
        chosen = rss[(stamps > start) & (stamps < end)]
        assert len(chosen) >= 3, f"too few samples between {start} and {end}: {stamps}"
        return chosen

    baseline = np.median(during(marks["first_start"] - 0.6, marks["first_start"] - 0.05))
    assert np.all(np.abs(during(marks["first_done"] + lag_s, marks["second_start"] - 0.05)
                         - (baseline + step_mb)) < tolerance_mb)
    assert np.all(np.abs(during(marks["second_done"] + lag_s, marks["free_start"] - 0.05)
                         - (baseline + 2 * step_mb)) < tolerance_mb)
    assert np.all(np.abs(during(marks["free_done"] + lag_s, marks["end"]) - baseline)
                  < tolerance_mb)
    # each step shows up in the first samples after it happened, not before
    for start, done, steps in (("first_start", "first_done", 1),
                               ("second_start", "second_done", 2)):
        level = baseline + steps * step_mb - tolerance_mb
        first_high = stamps[np.argmax(rss > level)]
        assert marks[start] - 0.1 <= first_high <= marks[done] + lag_s, (marks, first_high)
    # samples every ~0.1 s with real timestamps; the run is the child's lifetime
    intervals = np.diff([s.t_s for s in samples])
    assert np.all(intervals > 0) and 0.09 < intervals.mean() < 0.2
    assert result.rss_peak_mb >= baseline + 2 * step_mb - tolerance_mb
    lifetime_s = marks["end"] - marks["first_start"] + 0.8
    assert lifetime_s - 0.1 < result.running_time_s < lifetime_s + 5.0
    assert result.gpu_max_mb is None and all(s.gpu_used_mb is None for s in samples)
    assert result.cpu_area_percent_s >= 0 and result.ram_used_peak_mb > 0
    assert max(s.tree_processes for s in samples) == 3


def test_a_busy_child_shows_in_the_system_cpu_area(tmp_path):
    image = tiny_image(tmp_path / "images", "busy")
    busy_s = 1.5
    spin = f"import time\nend = time.time() + {busy_s}\nwhile time.time() < end: pass"
    command = (f"{PYTHON} -c '{spin}'; "
               "cp {inputs}/{name}_0000.nii.gz {outputs}/{name}.nii.gz")
    result, samples = trace.trace_case(image, command, tmp_path / "busy.log", no_gpu())
    assert result.status == "ok", (tmp_path / "busy.log").read_text()
    one_core_percent = 100.0 / psutil.cpu_count()
    # other work on the machine can only add to the system-wide figure
    assert result.cpu_area_percent_s >= 0.7 * one_core_percent * busy_s
    assert result.cpu_area_percent_s <= 100.0 * result.running_time_s + 1e-6
    assert all(0.0 <= s.cpu_percent <= 100.0 for s in samples)
    assert result.cpu_mean_percent == pytest.approx(result.cpu_area_percent_s / samples[-1].t_s)


def _pid_gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_timeout_kills_the_whole_tree_even_processes_that_ignore_sigterm(tmp_path):
    image = tiny_image(tmp_path / "images", "stuck")
    in_group, left_group = tmp_path / "in_group.pid", tmp_path / "left_group.pid"
    command = (f"trap '' TERM; sleep 60 & echo $! > {in_group}; "
               f"setsid sleep 60 & echo $! > {left_group}; wait")
    start = time.monotonic()
    result, samples = trace.trace_case(image, command, tmp_path / "stuck.log", no_gpu(),
                                       timeout_s=1.5, kill_grace_s=1.0)
    assert result.status == "timeout" and "timed out after 1.5 s" in result.reason
    assert result.exit_code == -9  # SIGTERM was ignored, so SIGKILL ended it after the grace
    assert 2.4 < result.running_time_s < 10 and time.monotonic() - start < 15
    for pid_file in (in_group, left_group):
        pid = int(pid_file.read_text())
        assert _pid_gone(pid), f"{pid_file.name}: process {pid} still running"
    assert max(s.tree_processes for s in samples) >= 3
    assert (tmp_path / "stuck.log").read_text().startswith("# trace: trap")


def test_missing_output_nonzero_exit_and_leftover_processes_are_reported(tmp_path):
    image = tiny_image(tmp_path / "images", "case")
    quiet = trace.trace_case(image, "echo nothing written", tmp_path / "a.log", no_gpu())[0]
    assert (quiet.status, quiet.reason, quiet.exit_code) == ("failed", "no output case.nii.gz", 0)
    crashed = trace.trace_case(image, "cp {inputs}/{name}_0000.nii.gz {outputs}/{name}.nii.gz; "
                               "exit 3", tmp_path / "b.log", no_gpu())[0]
    assert (crashed.status, crashed.reason) == ("failed", "exit code 3")
    pid_file = tmp_path / "leftover.pid"
    kept = tmp_path / "kept" / "case.nii.gz"
    tidy = trace.trace_case(image, f"sleep 60 & echo $! > {pid_file}; "
                            "cp {inputs}/{name}_0000.nii.gz {outputs}/{name}.nii.gz",
                            tmp_path / "c.log", no_gpu(), keep_output=kept)[0]
    assert tidy.status == "ok" and tidy.leftover_processes_killed
    assert _pid_gone(int(pid_file.read_text()))
    assert kept.read_bytes() == image.read_bytes()


# ----- the GPU path, with NVML faked --------------------------------------------------------

class FakeNvml:
    """Stands in for the pynvml module: one or more GPUs whose memory follows ``used_mib``."""

    class NVMLError(Exception):
        pass

    def __init__(self, init_error=None, devices=1, used_mib=lambda call: 3000.5,
                 processes=lambda: [], processes_error=None):
        self.init_error, self.devices, self.used_mib = init_error, devices, used_mib
        self.processes, self.processes_error = processes, processes_error
        self.memory_calls, self.shutdowns = 0, 0
        self.total = 80 * 1024 * MIB

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.devices

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return b"Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle):
        self.memory_calls += 1
        used = int(self.used_mib(self.memory_calls) * MIB)
        # NVML's own "used" (v2) leaves out reserved memory: the organisers use total - free
        return SimpleNamespace(total=self.total, free=self.total - used, used=used - 300 * MIB)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if self.processes_error:
            raise self.NVMLError(self.processes_error)
        return self.processes()


def test_gpu_reading_is_total_minus_free_in_mib_and_per_process_memory_of_the_tree():
    processes = [SimpleNamespace(pid=111, usedGpuMemory=2048 * MIB),
                 SimpleNamespace(pid=222, usedGpuMemory=1024 * MIB),
                 SimpleNamespace(pid=333, usedGpuMemory=None)]  # NVML: not available
    gpu = trace.Gpu(0, nvml=FakeNvml(processes=lambda: processes))
    assert gpu.available and gpu.name == "Fake GPU" and gpu.total_mb == 80 * 1024
    assert gpu.read([111, 999]) == {"gpu_used_mb": 3000.5, "gpu_tree_mb": 2048.0,
                                    "gpu_processes_mb": 3072.0, "gpu_util_percent": 37.0}


def test_gpu_per_process_memory_not_supported_leaves_only_those_columns_empty():
    gpu = trace.Gpu(0, nvml=FakeNvml(processes_error="Not Supported"))
    reading = gpu.read([1])
    assert reading["gpu_used_mb"] == 3000.5 and reading["gpu_util_percent"] == 37.0
    assert reading["gpu_tree_mb"] is None and reading["gpu_processes_mb"] is None


def test_no_nvml_library_or_no_such_gpu_is_reported_not_raised():
    gpu = trace.Gpu(0, nvml=FakeNvml(init_error="NVML Shared Library Not Found"))
    assert not gpu.available and "NVML Shared Library Not Found" in gpu.reason
    assert set(gpu.read([1]).values()) == {None}
    fake = FakeNvml(devices=1)
    missing = trace.Gpu(3, nvml=fake)
    assert not missing.available and "index 3" in missing.reason and fake.shutdowns == 1
    real = trace.Gpu(0)  # the installed pynvml on this machine: works, or says why not
    assert real.available or real.reason
    real.close()


def test_gpu_trace_of_a_real_command_with_fake_nvml_gives_the_flare_numbers(tmp_path):
    # Children the test process had before (such as multiprocessing's resource tracker, left by
    # an earlier test's process pool) are not the command's.
    earlier = {p.pid for p in psutil.Process().children(recursive=True)}

    def tree_of_this_test():  # NVML would list the command's processes, plus one stranger
        children = [p for p in psutil.Process().children(recursive=True) if p.pid not in earlier]
        return ([SimpleNamespace(pid=p.pid, usedGpuMemory=256 * MIB) for p in children]
                + [SimpleNamespace(pid=1, usedGpuMemory=100 * MIB)])

    # 1000 MiB for the reading before the command and the first 5 samples, then 5000 MiB
    fake = FakeNvml(used_mib=lambda call: 1000.0 if call <= 6 else 5000.0,
                    processes=tree_of_this_test)
    gpu = trace.Gpu(0, nvml=fake)
    fake.memory_calls = 0
    image = tiny_image(tmp_path / "images", "gpu")
    result, samples = trace.trace_case(
        image, f"{PYTHON} -c 'import time; time.sleep(1.5)'; "
        "cp {inputs}/{name}_0000.nii.gz {outputs}/{name}.nii.gz", tmp_path / "gpu.log", gpu)
    assert result.status == "ok" and result.gpu_used_before_mb == 1000.0
    memory = [s.gpu_used_mb for s in samples]
    assert memory[:5] == [1000.0] * 5 and set(memory[5:]) == {5000.0} and len(memory) >= 12
    assert result.gpu_max_mb == 5000.0 and result.gpu_max_mb_flare21 == 5000.0
    high_since_s = samples[5].t_s
    assert result.gpu_area_mb_s_flare22 == pytest.approx(
        (5000 - 2048) * (result.running_time_s - high_since_s), rel=1e-6)
    assert result.gpu_area_mb_s == pytest.approx(
        1000 * (high_since_s - samples[0].t_s) + 5000 * (result.running_time_s - high_since_s),
        rel=1e-6)
    assert result.gpu_util_mean_percent == 37.0
    assert result.gpu_tree_max_mb >= 256.0
    assert any(s.gpu_processes_mb - s.gpu_tree_mb == 100.0 for s in samples)


# ----- the command line, end to end ---------------------------------------------------------

CASE_SCRIPT = textwrap.dedent("""
    import shutil, sys, time
    inputs, outputs, name = sys.argv[1:4]
    print(f"segmenting {name}", flush=True)
    if name == "slow":
        time.sleep(60)
    if name == "nooutput":
        sys.exit(0)
    shutil.copy(f"{inputs}/{name}_0000.nii.gz", f"{outputs}/{name}.nii.gz")
    if name == "crash":
        print("crash: giving up", file=sys.stderr)
        sys.exit(3)
""")


def test_command_line_traces_cases_and_reports_failures_and_timeouts(tmp_path):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    names = ["case_a", "case_b", "crash", "nooutput", "slow"]
    for name in names:
        tiny_image(inputs, name)
    script = tmp_path / "submission.py"
    script.write_text(CASE_SCRIPT)
    started = time.monotonic()
    completed = subprocess.run(
        [PYTHON, "-m", "evaluation.trace", str(inputs), "--out", str(out),
         "--command", f"{PYTHON} {script} {{inputs}} {{outputs}} {{name}}",
         "--timeout", "5", "--kill-grace", "1"],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 1, completed.stderr
    assert time.monotonic() - started < 60

    lines = completed.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == names
    assert lines[0].startswith("case_a: ok;") and lines[1].startswith("case_b: ok;")
    assert lines[2].startswith("crash: FAILED (exit code 3)")
    assert lines[3].startswith("nooutput: FAILED (no output nooutput.nii.gz)")
    assert lines[4].startswith("slow: TIMEOUT (timed out after 5 s")
    assert lines[5].startswith("2 of 5 cases ok")

    with open(out / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["name"], r["status"]) for r in rows] == [
        ("case_a", "ok"), ("case_b", "ok"), ("crash", "failed"), ("nooutput", "failed"),
        ("slow", "timeout")]
    assert 5.0 <= float(rows[4]["running_time_s"]) < 20
    assert all(0 < float(r["running_time_s"]) < 5 for r in rows[:4])
    summary = json.loads((out / "summary.json").read_text())
    assert [c["status"] for c in summary["cases"]] == [r["status"] for r in rows]
    assert summary["settings"]["interval_s"] == 0.1 and "{name}" in summary["settings"]["command"]

    for name in names:
        with open(out / "samples" / f"{name}.csv", newline="") as file:
            samples = list(csv.DictReader(file))
        assert samples and list(samples[0]) == trace.SAMPLE_COLUMNS
        times_s = [float(s["t_s"]) for s in samples]
        assert times_s == sorted(times_s)
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"segmenting {name}" in (out / "logs" / f"{name}.log").read_text()
    assert len(samples) >= 25  # the slow case: 5 s at 0.1 s, with room for a busy machine
    assert "crash: giving up" in (out / "logs" / "crash.log").read_text()
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".part"))]

    gpu_columns = ["gpu_max_mb_flare21", "gpu_max_mb", "gpu_area_mb_s_flare22"]
    if summary["settings"]["gpu"]["available"]:
        assert all(r[c] != "" for r in rows for c in gpu_columns)
    else:  # said once, clearly, and the GPU columns stay empty
        assert completed.stderr.count("no GPU measurement") == 1
        assert all(r[c] == "" for r in rows for c in gpu_columns)


def test_default_docker_line_without_docker_or_image_is_a_failed_case_not_a_crash(tmp_path, capsys):
    tiny_image(tmp_path / "inputs", "case")
    code = trace.main([str(tmp_path / "inputs"), "--out", str(tmp_path / "out"), "--team",
                       "no-such-team-image", "--no-plots", "--quiet", "--timeout", "60"])
    assert code == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["command"].startswith("docker container run --gpus=\"device=0\"")
    assert summary["settings"]["after_timeout"] == "docker container rm --force no-such-team-image"
    case = summary["cases"][0]
    assert case["status"] == "failed" and case["reason"].startswith("exit code")
    assert "case: FAILED (exit code" in capsys.readouterr().out


def test_a_folder_without_flare_named_images_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "scan.nii.gz").write_bytes(b"not FLARE-named")
    assert trace.main([str(tmp_path / "inputs"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "no images named NAME_0000.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
