"""Runtime, GPU memory, CPU and RAM of a submission, measured the way the FLARE organisers do.

    python -m evaluation.trace INPUTS --out OUT [--team TEAM | --command CMD] [--gpu 0]
                               [--interval 0.1] [--timeout 600] [--cases N] [--names A B ...]

For each ``NAME_0000.nii.gz`` in INPUTS: copy that one image alone into a fresh ``inputs/`` folder
(and make an empty ``outputs/``), start the command in a new session, sample every ``--interval``
seconds while it runs, wait for it (killing its whole process group after ``--timeout`` s), check
that ``outputs/NAME.nii.gz`` appeared, and go on with the next case. The default command is the
organisers' line (../shared/METHOD.md, "Challenge evaluation"):

    docker container run --gpus="device=0" --name TEAM --rm -v $PWD/inputs/:/workspace/inputs/
        -v $PWD/outputs/:/workspace/outputs/ TEAM:latest /bin/bash -c "sh predict.sh"

with the case's folders in place of ``$PWD/inputs/`` and ``$PWD/outputs/``. ``--command`` runs
anything else; ``{inputs}``, ``{outputs}`` and ``{name}`` in it become the case's folders and name
(substituted shell-quoted: do not add quotes around them). Example, no docker:

    python -m evaluation.trace INPUTS --out OUT --command "sh predict.sh {inputs} {outputs}"

Written to OUT: ``samples/NAME.csv`` (one row per sample), ``summary.csv`` and ``summary.json``
(one record per case, rules and settings), ``plots/NAME.png``, ``overview.png`` and
``logs/NAME.log`` (the command's stdout and stderr). Exit status 1 when any case failed or timed
out, 2 when there is nothing to run.

Units: MB means MiB (2**20 bytes), as the organisers' scripts compute it (NVML bytes / 1024 / 1024);
seconds (s); CPU utilisation in percent of the whole machine (all cores together, 0-100 %).
Without an NVIDIA GPU or NVML library the GPU columns stay empty (said once on stderr) and time,
CPU and RAM are still measured.
"""

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil

from app.cli import IMAGE_SUFFIX
from evaluation.sampling import PeriodicSampler

# The organisers' sampling period, s (METHOD.md, "Challenge evaluation (FLARE21)").
SAMPLE_INTERVAL_S = 0.1
# FLARE21 "maximum GPU memory": the largest value present in MORE than this fraction of samples.
FLARE21_SAMPLE_FRACTION = 0.02
# FLARE22 area under the GPU memory-time curve counts only memory above this, MB (MiB).
FLARE22_GPU_ALLOWANCE_MB = 2048.0
BYTES_PER_MB = 2 ** 20  # MiB; the organisers divide NVML's bytes by 1024 twice
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_KILL_GRACE_S = 5.0
ORGANISERS_COMMAND = ('docker container run --gpus="device={gpu}" --name {team} --rm '
                      '-v {inputs}/:/workspace/inputs/ -v {outputs}/:/workspace/outputs/ '
                      '{image} /bin/bash -c "sh predict.sh"')


# ---------------------------------------------------------------------------------------------
# Aggregation: pure functions on sample series.
# ---------------------------------------------------------------------------------------------

def flare21_max_gpu_mb(values_mb, fraction=FLARE21_SAMPLE_FRACTION):
    """FLARE21 "maximum GPU memory", MB: the largest value present in more than 2 % of the samples.

    A value v qualifies when ``count(samples == v) > fraction * n``, n = number of samples
    (missing readings, ``None`` or NaN, are dropped first and do not count in n). Equality is exact:
    NVML gives memory in bytes, so equal byte counts give equal MB values and repeats are common,
    but 1000.0 and 1000.5 MB are two different values (no binning). Strictly more than 2 %: with
    n = 100 a value seen exactly twice does not qualify, three times does. This is the
    organisers' rule (``mem.count(v) > 0.02 * len(mem)``).

    Edge cases: with fewer than 50 samples every value present qualifies (1 > 0.02 n), so the
    result is the plain maximum; when no value qualifies (e.g. 50 or more samples, all distinct)
    the result is ``None`` (the organisers' script would fail on such a case); no samples: ``None``.
    """
    values = [float(v) for v in values_mb if v is not None and not math.isnan(v)]
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    qualifying = [value for value, count in counts.items() if count > fraction * len(values)]
    return max(qualifying) if qualifying else None


def step_area(times_s, values, end_s):
    """Area under a sample-and-hold curve (left Riemann sum with the real sample times).

    Sample i holds its value from ``times_s[i]`` until the next sample's time; the last sample
    holds until ``end_s``: area = sum_i values[i] * (t[i+1] - t[i]) with t[n] = end_s. Units are
    those of the values times seconds (MB*s, %*s). Samples whose value is ``None`` or NaN
    contribute nothing over their interval. Times must not decrease and ``end_s`` must not come
    before the last sample (ValueError). No samples: 0.0.

    Left Riemann rather than trapezoid because the organisers' area is the same rectangle rule
    (sum of samples * 0.1 s) and memory moves in steps: a trapezoid would smear each step over a
    sampling interval.
    """
    times_s = [float(t) for t in times_s]
    if len(times_s) != len(values):
        raise ValueError(f"{len(times_s)} times but {len(values)} values")
    if not times_s:
        return 0.0
    edges = times_s + [float(end_s)]
    if any(b < a for a, b in zip(edges, edges[1:])):
        raise ValueError("sample times must not decrease, nor end_s precede the last sample")
    return float(sum(value * (b - a) for value, a, b in zip(values, edges, edges[1:])
                     if value is not None and not math.isnan(value)))


def flare22_gpu_area_mb_s(times_s, values_mb, end_s, allowance_mb=FLARE22_GPU_ALLOWANCE_MB):
    """FLARE22 area under the GPU memory-time curve, MB*s, counting only memory above 2048 MB.

    Integrand max(0, memory - 2048 MB), integrated with ``step_area`` (each sample holds until the
    next, real intervals, the last until ``end_s``). A sample at 3000 MB held 0.5 s adds
    (3000 - 2048) * 0.5 = 476 MB*s; any sample at or below 2048 MB adds 0. ``allowance_mb=0``
    gives the plain area under the curve.
    """
    above = [None if v is None or math.isnan(v) else max(0.0, float(v) - allowance_mb)
             for v in values_mb]
    return step_area(times_s, above, end_s)


def cpu_area_percent_s(times_s, cpu_percent, start_s=0.0):
    """Area under the system CPU utilisation-time curve, %*s.

    Each reading is psutil's system-wide utilisation averaged since the previous reading (the
    first since ``start_s``, when the counter was primed), so reading i covers (t[i-1], t[i]]:
    area = sum_i cpu[i] * (t[i] - t[i-1]) with t[-1] = start_s. Exact for those averages.
    100 % means every core busy; 10 s at 50 % adds 500 %*s.
    """
    times_s = [float(t) for t in times_s]
    if not times_s:
        return 0.0
    return step_area([float(start_s)] + times_s[:-1], list(cpu_percent), times_s[-1])


# ---------------------------------------------------------------------------------------------
# Measurement: NVML, process tree, sampler thread.
# ---------------------------------------------------------------------------------------------

class Gpu:
    """NVML reader for one GPU, or the reason why there is none (``available``, ``reason``).

    ``nvml`` is the nvidia-ml-py module (``pynvml``), imported when not given; a test may pass a
    stand-in object with the same functions. Never raises for a missing GPU, driver or library.
    """

    def __init__(self, index=0, nvml=None):
        self.index, self.available, self.reason = index, False, None
        self.name = self.total_mb = self._nvml = self._handle = None
        try:
            if nvml is None:
                import pynvml as nvml
        except ImportError as error:
            self.reason = f"nvidia-ml-py (module pynvml) is not installed ({error})"
            return
        try:
            nvml.nvmlInit()
        except Exception as error:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            self.reason = f"NVML could not start: {error}"
            return
        try:
            count = nvml.nvmlDeviceGetCount()
            if not 0 <= index < count:
                raise LookupError(f"GPU index {index} does not exist (NVML sees {count} GPU(s))")
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.total_mb = nvml.nvmlDeviceGetMemoryInfo(handle).total / BYTES_PER_MB
        except Exception as error:
            self.reason = str(error)
            nvml.nvmlShutdown()
            return
        self._nvml, self._handle, self.available = nvml, handle, True

    def read(self, pids=()):
        """One reading as a dict: ``gpu_used_mb`` (total minus free, the organisers' figure, MB),
        ``gpu_tree_mb`` (NVML per-process memory of the compute processes whose PID is in
        ``pids``, MB), ``gpu_processes_mb`` (the same for all compute processes on the GPU),
        ``gpu_util_percent``. Each is ``None`` where NVML does not give it; all are ``None``
        without a GPU or when the memory query fails."""
        reading = dict.fromkeys(
            ("gpu_used_mb", "gpu_tree_mb", "gpu_processes_mb", "gpu_util_percent"))
        if not self.available:
            return reading
        nvml, handle = self._nvml, self._handle
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception:
            return reading
        reading["gpu_used_mb"] = (memory.total - memory.free) / BYTES_PER_MB
        try:
            reading["gpu_util_percent"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            pass
        try:
            processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            return reading
        known = [p for p in processes if getattr(p, "usedGpuMemory", None) is not None]
        if processes and not known:
            return reading  # NVML lists the processes but not their memory (e.g. Windows WDDM)
        pids = set(pids)
        reading["gpu_processes_mb"] = sum(p.usedGpuMemory for p in known) / BYTES_PER_MB
        reading["gpu_tree_mb"] = sum(p.usedGpuMemory for p in known if p.pid in pids) / BYTES_PER_MB
        return reading

    def close(self):
        if self.available:
            self.available = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def process_tree(pid):
    """The process ``pid`` and all its descendants (psutil.Process list); [] once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def tree_rss_mb(processes):
    """Sum of the resident set sizes of ``processes``, MB; processes that vanished count 0.

    Pages shared between processes (libraries) count once per process, so this overstates a
    little, as ``ps`` sums do."""
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total / BYTES_PER_MB


@dataclass
class Sample:
    """One sampling instant. Times in s, memory in MB (MiB), utilisation in %; None: not measured.

    The time is taken just before the readings (process tree, NVML, CPU, RAM), which follow
    within milliseconds."""
    t_s: float                 # since the command was started (monotonic clock)
    unix_time_s: float         # the same instant as wall-clock time (time.time())
    gpu_used_mb: float = None  # whole GPU, total - free (the organisers' figure)
    gpu_tree_mb: float = None  # NVML per-process memory of the command's process tree
    gpu_processes_mb: float = None  # NVML per-process memory of every compute process on the GPU
    gpu_util_percent: float = None
    cpu_percent: float = None  # whole machine, averaged since the previous sample
    rss_tree_mb: float = 0.0   # resident memory of the command's process tree
    ram_used_mb: float = None  # whole machine (psutil virtual_memory().used, as the organisers)
    tree_processes: int = 0


SAMPLE_COLUMNS = [f.name for f in fields(Sample)]


class Sampler(PeriodicSampler):
    """The trace's readings of a process tree every ``interval_s`` on a fixed schedule from
    ``start_monotonic`` (PeriodicSampler: missed slots skipped, a failed reading skipped)."""

    def __init__(self, pid, start_monotonic, interval_s, gpu):
        super().__init__(self.sample, interval_s, start_monotonic, name="trace")
        self.pid, self.gpu = pid, gpu

    def sample(self):
        now = time.monotonic()
        unix_time = time.time()
        processes = process_tree(self.pid)
        reading = self.gpu.read(p.pid for p in processes)
        return Sample(t_s=now - self.start_monotonic, unix_time_s=unix_time, **reading,
                      cpu_percent=psutil.cpu_percent(interval=None),
                      rss_tree_mb=tree_rss_mb(processes),
                      ram_used_mb=psutil.virtual_memory().used / BYTES_PER_MB,
                      tree_processes=len(processes))


# ---------------------------------------------------------------------------------------------
# One case.
# ---------------------------------------------------------------------------------------------

def organisers_command(team, image=None, gpu=0):
    """The organisers' docker line for image ``image`` (default ``TEAM:latest``) on GPU ``gpu``,
    with ``{inputs}``/``{outputs}`` left for ``render_command``."""
    return (ORGANISERS_COMMAND.replace("{gpu}", str(int(gpu)))
            .replace("{team}", shlex.quote(team))
            .replace("{image}", shlex.quote(image or f"{team}:latest")))


def render_command(template, **values):
    """``template`` with ``{inputs}``, ``{outputs}``, ``{name}`` replaced by shell-quoted values.

    Only these placeholders are touched, so shell text such as ``${VAR}`` or ``awk '{print}'``
    passes through unchanged."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", shlex.quote(str(value)))
    return template


def _signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(process, grace_s):
    """End a command started with ``start_new_session=True``: SIGTERM to its process group, then,
    after ``grace_s`` s, SIGKILL to the group and to any descendant that left the group."""
    descendants = process_tree(process.pid)[1:]  # the root is reaped by Popen, not psutil
    deadline = time.monotonic() + grace_s
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(descendants, timeout=max(0.0, deadline - time.monotonic()))
    alive += _group_members(process.pid)
    _signal_group(process.pid, signal.SIGKILL)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.Error:
            pass
    process.wait()
    _wait_gone(alive)


def _running(process):
    """True while ``process`` exists and is not a zombie (dead, waiting to be reaped)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_members(pgid):
    """The processes still running (not zombies) in process group ``pgid``."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and _running(process):
                members.append(process)
        except (ProcessLookupError, PermissionError):
            pass
    return members


def _wait_gone(processes, timeout_s=10.0):
    """Wait until the killed ``processes`` have died: a signal is not delivered instantly, and the
    next case must not start beside them."""
    deadline = time.monotonic() + timeout_s
    while any(_running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.01)


@dataclass
class CaseResult:
    """What ``trace_case`` measured for one case (units in the names; None = not measured)."""
    name: str
    status: str                  # "ok", "failed" or "timeout"
    reason: str                  # why it failed ("" when ok)
    exit_code: int               # the command's exit status (negative: killed by that signal)
    running_time_s: float        # wall clock around the command
    samples: int
    mean_interval_s: float       # achieved sampling interval
    max_interval_s: float
    gpu_max_mb_flare21: float    # largest value in > 2 % of the samples (FLARE21)
    gpu_max_mb: float            # plain maximum of the samples
    gpu_area_mb_s_flare22: float  # area above 2048 MB (FLARE22)
    gpu_area_mb_s: float         # area of the whole curve
    gpu_used_before_mb: float    # whole GPU just before the command started (other processes)
    gpu_tree_max_mb: float       # NVML per-process memory of the command's tree, maximum
    gpu_processes_max_mb: float  # NVML per-process memory of all compute processes, maximum
    gpu_util_mean_percent: float
    cpu_area_percent_s: float
    cpu_mean_percent: float      # time-weighted: cpu_area_percent_s / time of the last sample
    cpu_max_percent: float
    rss_peak_mb: float           # process tree, largest sample
    ram_used_peak_mb: float      # whole machine, largest sample
    leftover_processes_killed: bool  # the command exited but left processes in its group


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(name, samples, running_time_s, status="ok", reason="", exit_code=0,
              gpu_used_before_mb=None, leftover_processes_killed=False):
    """A ``CaseResult`` from the samples of one case; the command ran from 0 to ``running_time_s``
    s. GPU figures are None when no sample has a GPU reading."""
    times = [s.t_s for s in samples]
    gpu = [s.gpu_used_mb for s in samples]
    intervals = [b - a for a, b in zip(times, times[1:])]
    has_gpu = any(v is not None for v in gpu)
    end_s = max([running_time_s] + times)  # == running_time_s for trace_case's samples
    cpu_area = cpu_area_percent_s(times, [s.cpu_percent for s in samples])
    return CaseResult(
        name=name, status=status, reason=reason, exit_code=exit_code,
        running_time_s=running_time_s, samples=len(samples),
        mean_interval_s=_mean(intervals), max_interval_s=_max(intervals),
        gpu_max_mb_flare21=flare21_max_gpu_mb(gpu), gpu_max_mb=_max(gpu),
        gpu_area_mb_s_flare22=flare22_gpu_area_mb_s(times, gpu, end_s) if has_gpu else None,
        gpu_area_mb_s=step_area(times, gpu, end_s) if has_gpu else None,
        gpu_used_before_mb=gpu_used_before_mb,
        gpu_tree_max_mb=_max(s.gpu_tree_mb for s in samples),
        gpu_processes_max_mb=_max(s.gpu_processes_mb for s in samples),
        gpu_util_mean_percent=_mean(s.gpu_util_percent for s in samples),
        cpu_area_percent_s=cpu_area,
        cpu_mean_percent=cpu_area / times[-1] if times and times[-1] > 0 else None,
        cpu_max_percent=_max(s.cpu_percent for s in samples),
        rss_peak_mb=_max(s.rss_tree_mb for s in samples),
        ram_used_peak_mb=_max(s.ram_used_mb for s in samples),
        leftover_processes_killed=leftover_processes_killed)


def case_name(image_path):
    """``NAME`` of ``NAME_0000.nii.gz``."""
    return Path(image_path).name[: -len(IMAGE_SUFFIX)]


def trace_case(image_path, command_template, log_path, gpu, *, interval_s=SAMPLE_INTERVAL_S,
               timeout_s=DEFAULT_TIMEOUT_S, kill_grace_s=DEFAULT_KILL_GRACE_S, workdir=None,
               keep_output=None, after_timeout=None):
    """Run the command on one image alone, sampling while it runs; returns (CaseResult, samples).

    The image is copied into a fresh ``inputs/`` folder next to an empty ``outputs/`` (both in a
    new temporary folder under ``workdir``, removed afterwards). The command runs through
    ``/bin/sh -c`` in a new session, stdout and stderr going to ``log_path``. After ``timeout_s``
    its process group is ended (``stop_process_group``) and ``after_timeout`` (a shell command,
    e.g. ``docker container rm --force TEAM``) runs. The case is "ok" when the command exited 0 and
    ``outputs/NAME.nii.gz`` exists and is not empty; ``keep_output`` (a path) receives that file.
    """
    name = case_name(image_path)
    case_dir = Path(tempfile.mkdtemp(prefix=f"trace-{name}-", dir=workdir))
    try:
        inputs, outputs = case_dir / "inputs", case_dir / "outputs"
        inputs.mkdir()
        outputs.mkdir()
        os.chmod(outputs, 0o777)  # a container running as another user must be able to write
        shutil.copyfile(image_path, inputs / Path(image_path).name)
        command = render_command(command_template, inputs=inputs, outputs=outputs, name=name)
        expected = outputs / f"{name}.nii.gz"
        return _run_and_sample(name, command, expected, log_path, gpu, interval_s, timeout_s,
                               kill_grace_s, keep_output, after_timeout)
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)  # files a container wrote as root may stay


def _run_and_sample(name, command, expected, log_path, gpu, interval_s, timeout_s, kill_grace_s,
                    keep_output, after_timeout):
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    partial_log = log_path.with_name(log_path.name + ".part")
    gpu_before = gpu.read()["gpu_used_mb"]
    timed_out = False
    with open(partial_log, "wb") as log:
        log.write(f"# trace: {command}\n".encode())
        log.flush()
        psutil.cpu_percent(interval=None)  # prime: the first sample averages from here
        start = time.monotonic()
        process = subprocess.Popen(command, shell=True, cwd=os.getcwd(), stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = Sampler(process.pid, start, interval_s, gpu).start()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_process_group(process, kill_grace_s)
        except BaseException:  # Ctrl-C: leave nothing running
            stop_process_group(process, 0)
            raise
        finally:
            running_time_s = time.monotonic() - start
            # a sample taken after the command ended does not belong to it
            samples = [s for s in sampler.stop() if s.t_s <= running_time_s]
        leftovers = [] if timed_out else _group_members(process.pid)
        if leftovers:
            _signal_group(process.pid, signal.SIGKILL)
            _wait_gone(leftovers)
    if timed_out and after_timeout:
        subprocess.run(after_timeout, shell=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)
    os.replace(partial_log, log_path)

    has_output = expected.is_file() and expected.stat().st_size > 0
    if timed_out:
        status, reason = "timeout", f"timed out after {timeout_s:g} s (process group killed)"
    elif process.returncode != 0 or not has_output:
        problems = [f"exit code {process.returncode}"] if process.returncode != 0 else []
        if not has_output:
            problems.append(f"no output {expected.name}")
        status, reason = "failed", "; ".join(problems)
    else:
        status, reason = "ok", ""
    if has_output and keep_output is not None:
        _atomic_write(keep_output, lambda temporary: shutil.copyfile(expected, temporary))
    result = summarize(name, samples, running_time_s, status=status, reason=reason,
                       exit_code=process.returncode, gpu_used_before_mb=gpu_before,
                       leftover_processes_killed=bool(leftovers))
    return result, samples


# ---------------------------------------------------------------------------------------------
# Files and the whole run.
# ---------------------------------------------------------------------------------------------

def _atomic_write(path, write):
    """Call ``write(temporary_path)``, then rename the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e5 else f"{value:.3f}"
    return value


def write_csv(path, columns, rows):
    """Rows (dicts) as CSV with ``columns``; None becomes an empty cell."""
    def write(temporary):
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_cell(row[c]) for c in columns])
    _atomic_write(path, write)


def write_json(path, data):
    def write(temporary):
        Path(temporary).write_text(json.dumps(data, indent=2) + "\n")
    _atomic_write(path, write)


RESULT_COLUMNS = [f.name for f in fields(CaseResult)]
RULES = {
    "units": "MB = MiB = 2**20 bytes (NVML bytes / 1024 / 1024, as the organisers); s; % of the "
             "whole machine (all cores) for CPU",
    "running_time_s": "wall clock from starting the command to its end (docker start-up, model "
                      "loading and I/O included when the command is the organisers' docker line)",
    "gpu_used_mb": "NVML nvmlDeviceGetMemoryInfo total - free of the whole GPU",
    "gpu_max_mb_flare21": "largest value v with count(samples == v) > 0.02 * n (exact equality); "
                          "fewer than 50 samples: the plain maximum; no value qualifies: empty",
    "gpu_area_mb_s_flare22": "sum_i max(0, gpu_used_mb[i] - 2048) * (t[i+1] - t[i]), the last "
                             "sample held until the command ended (left Riemann, real intervals)",
    "gpu_area_mb_s": "the same with no allowance",
    "cpu_area_percent_s": "sum_i cpu_percent[i] * (t[i] - t[i-1]); each reading is psutil's "
                          "system-wide utilisation since the previous reading",
    "rss_peak_mb": "largest sum of RSS over the command's process tree (psutil children, "
                   "recursive); under docker this is only the docker client",
    "ram_used_peak_mb": "largest psutil.virtual_memory().used of the whole machine (the "
                        "organisers' RAM figure; includes everything else running)",
}


class NoCasesError(FileNotFoundError):
    """The inputs folder, or a requested case in it, is missing (nothing to trace)."""


def find_cases(inputs, names=None, limit=None):
    """The ``NAME_0000.nii.gz`` images in ``inputs``, sorted; only ``names`` when given (a missing
    name is an error), at most ``limit``. Raises NoCasesError."""
    inputs = Path(inputs)
    if not inputs.is_dir():
        raise NoCasesError(f"{inputs}: input folder does not exist")
    paths = sorted(inputs.glob(f"*{IMAGE_SUFFIX}"))
    if names:
        by_name = {case_name(p): p for p in paths}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise NoCasesError(f"{inputs}: no {', '.join(n + IMAGE_SUFFIX for n in missing)}")
        paths = [by_name[n] for n in names]
    return paths[:limit] if limit is not None else paths


def summary_line(result):
    """One line per case for stdout."""
    gpu = ("GPU n/a" if result.gpu_max_mb is None else
           f"GPU max {_fmt(result.gpu_max_mb_flare21)} MB (FLARE21 2 % rule), "
           f"{result.gpu_max_mb:.0f} MB (plain), area {result.gpu_area_mb_s_flare22:.0f} MB*s "
           f"above 2048 MB")
    status = result.status
    if status != "ok":
        status = f"{status.upper()} ({result.reason})"
    return (f"{result.name}: {status}; {result.running_time_s:.2f} s; {gpu}; "
            f"CPU area {result.cpu_area_percent_s:.0f} %*s "
            f"(mean {_fmt(result.cpu_mean_percent)} %); "
            f"peak RSS {_fmt(result.rss_peak_mb)} MB; {result.samples} samples")


def _fmt(value, spec=".0f"):
    return "n/a" if value is None else format(value, spec)


def trace(inputs, out, command, *, gpu_index=0, interval_s=SAMPLE_INTERVAL_S,
          timeout_s=DEFAULT_TIMEOUT_S, kill_grace_s=DEFAULT_KILL_GRACE_S, names=None, limit=None,
          workdir=None, save_outputs=False, after_timeout=None, plots=True, nvml=None,
          progress=True):
    """Trace every case of ``inputs`` with ``command`` (a template, see ``render_command``) into
    the folder ``out``; returns the list of CaseResult. Settings as in the module docstring."""
    from tqdm import tqdm

    out = Path(out)
    cases = find_cases(inputs, names, limit)
    if not cases:
        raise NoCasesError(f"{inputs}: no images named NAME{IMAGE_SUFFIX}")
    gpu = Gpu(gpu_index, nvml=nvml)
    if not gpu.available:
        print(f"trace: no GPU measurement on GPU {gpu_index}: {gpu.reason}. The GPU columns stay "
              f"empty; running time, CPU and RAM are still measured.", file=sys.stderr)
    settings = {
        "command": command, "inputs": str(Path(inputs).resolve()), "interval_s": interval_s,
        "timeout_s": timeout_s, "kill_grace_s": kill_grace_s, "after_timeout": after_timeout,
        "gpu": {"index": gpu_index, "available": gpu.available, "reason": gpu.reason,
                "name": gpu.name, "total_mb": gpu.total_mb},
        "host": {"node": platform.node(), "cpus": psutil.cpu_count(),
                 "ram_total_mb": psutil.virtual_memory().total / BYTES_PER_MB},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rules": RULES,
    }
    results = []
    try:
        for image in tqdm(cases, unit="case", file=sys.stderr, disable=not progress):
            name = case_name(image)
            result, samples = trace_case(
                image, command, out / "logs" / f"{name}.log", gpu, interval_s=interval_s,
                timeout_s=timeout_s, kill_grace_s=kill_grace_s, workdir=workdir,
                keep_output=out / "outputs" / f"{name}.nii.gz" if save_outputs else None,
                after_timeout=after_timeout)
            results.append(result)
            write_csv(out / "samples" / f"{name}.csv", SAMPLE_COLUMNS, [asdict(s) for s in samples])
            write_csv(out / "summary.csv", RESULT_COLUMNS, [asdict(r) for r in results])
            write_json(out / "summary.json", {"settings": settings,
                                              "cases": [asdict(r) for r in results]})
            if plots:
                from evaluation.trace_plots import plot_case
                plot_case(out / "plots" / f"{name}.png", result, samples)
            tqdm.write(summary_line(result), file=sys.stdout)
            sys.stdout.flush()
        if plots:
            from evaluation.trace_plots import plot_overview
            plot_overview(out / "overview.png", results)
    finally:
        gpu.close()
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.trace",
        description="Run a submission case by case as the FLARE organisers do and record running "
                    "time, GPU memory (NVML), CPU and RAM every 0.1 s.")
    parser.add_argument("inputs", type=Path, help=f"folder of NAME{IMAGE_SUFFIX} images")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--team", default="team",
                        help="container name in the organisers' docker line (default 'team')")
    parser.add_argument("--image", default=None, help="docker image (default TEAM:latest)")
    parser.add_argument("--command", default=None,
                        help="run this instead of the docker line; {inputs}, {outputs}, {name} "
                             "are replaced (shell-quoted) by the case's folders and name")
    parser.add_argument("--gpu", type=int, default=0,
                        help="GPU index for NVML and docker (default 0)")
    parser.add_argument("--interval", type=float, default=SAMPLE_INTERVAL_S,
                        help=f"sampling interval, s (default {SAMPLE_INTERVAL_S})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"per-case timeout, s (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--kill-grace", type=float, default=DEFAULT_KILL_GRACE_S,
                        help="s between SIGTERM and SIGKILL on timeout (default 5)")
    parser.add_argument("--after-timeout", default=None,
                        help="shell command run after a timeout (default with the docker line: "
                             "docker container rm --force TEAM, since killing the docker client "
                             "leaves the container running; else nothing)")
    parser.add_argument("--cases", type=int, default=None, metavar="N",
                        help="only the first N cases")
    parser.add_argument("--names", nargs="+", default=None, help="only these case names")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the per-case inputs/outputs folders are made "
                             "(default: the system's temporary folder)")
    parser.add_argument("--save-outputs", action="store_true",
                        help="keep the outputs in OUT/outputs")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.interval <= 0 or args.timeout <= 0 or args.kill_grace < 0 or (args.cases or 1) < 1:
        parser.error("--interval, --timeout and --cases must be positive, "
                     "--kill-grace not negative")
    return args


def main(argv=None):
    args = parse_args(argv)
    command, after_timeout = args.command, args.after_timeout
    if command is None:
        command = organisers_command(args.team, args.image, args.gpu)
        if after_timeout is None:
            after_timeout = f"docker container rm --force {shlex.quote(args.team)}"
    try:
        results = trace(args.inputs, args.out, command, gpu_index=args.gpu,
                        interval_s=args.interval, timeout_s=args.timeout,
                        kill_grace_s=args.kill_grace, names=args.names,
                        limit=args.cases, workdir=args.workdir, save_outputs=args.save_outputs,
                        after_timeout=after_timeout, plots=not args.no_plots,
                        progress=not args.quiet)
    except NoCasesError as error:
        print(f"trace: {error}", file=sys.stderr)
        return 2
    bad = [r for r in results if r.status != "ok"]
    print(f"{len(results) - len(bad)} of {len(results)} cases ok; results in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
