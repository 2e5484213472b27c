"""A stand-in submission that holds known amounts of GPU memory, to check ``evaluation.trace``.

    python -m evaluation.gpu_load INPUTS OUTPUTS --hold 1024:2 4096:2 [--report FILE]

Allocates device memory with PyTorch (or CuPy where PyTorch is missing) so that, hold after hold,
``MB`` MiB are held for ``SECONDS`` s; then writes ``OUTPUTS/NAME.nii.gz`` for each
``INPUTS/NAME_0000.nii.gz`` (a copy: the trace only asks that the file appears). ``--report``
records, on the wall clock, when each hold began and ended and how much the framework had
reserved, so the trace's samples can be compared with what really was on the GPU.

It exists because the device machines lent to this project carry PyTorch and NVML but not
TensorFlow; see ``evaluation/check_trace_gpu.py``.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

IMAGE_SUFFIX = "_0000.nii.gz"  # as app.cli; not imported, so that no app dependency is needed
MIB = 2 ** 20


class TorchDevice:
    name = "torch"

    def __init__(self):
        import torch
        self.torch = torch
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # creates the context before the first hold
        torch.cuda.synchronize()

    def allocate(self, mib):
        block = self.torch.ones(mib * MIB, dtype=self.torch.uint8, device="cuda")
        self.torch.cuda.synchronize()
        return block

    def release(self):
        self.torch.cuda.empty_cache()  # hand cached blocks back to the driver

    def reserved_mib(self):
        return self.torch.cuda.memory_reserved() / MIB


class CupyDevice:
    name = "cupy"

    def __init__(self):
        import cupy
        self.cupy = cupy
        cupy.zeros(1)
        cupy.cuda.Device().synchronize()

    def allocate(self, mib):
        block = self.cupy.ones(mib * MIB, dtype=self.cupy.uint8)
        self.cupy.cuda.Device().synchronize()
        return block

    def release(self):
        self.cupy.get_default_memory_pool().free_all_blocks()

    def reserved_mib(self):
        return self.cupy.get_default_memory_pool().total_bytes() / MIB


def open_device():
    errors = []
    for kind in (TorchDevice, CupyDevice):
        try:
            return kind()
        except Exception as error:  # ImportError, no CUDA device, ...
            errors.append(f"{kind.name}: {error}")
    raise RuntimeError("no GPU framework could allocate memory (" + "; ".join(errors) + ")")


def hold(text):
    mib, _, seconds = text.partition(":")
    try:
        mib, seconds = int(mib), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MB:SECONDS") from None
    if mib < 0 or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: MB must be >= 0 and SECONDS > 0")
    return mib, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m evaluation.gpu_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path)
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--hold", type=hold, nargs="+", required=True, metavar="MB:SECONDS")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)

    started = time.time()
    try:
        device = open_device()
    except RuntimeError as error:
        print(f"gpu_load: {error}", file=sys.stderr)
        return 2
    record = {"pid": os.getpid(), "framework": device.name, "started": started,
              "context_ready": time.time(), "context_reserved_mib": device.reserved_mib(),
              "holds": []}
    for mib, seconds in args.hold:
        block = device.allocate(mib) if mib else None
        begin = time.time()
        time.sleep(seconds)
        record["holds"].append({"mib": mib, "begin": begin, "end": time.time(),
                                "reserved_mib": device.reserved_mib()})
        del block
        device.release()
    for image in sorted(args.inputs.glob(f"*{IMAGE_SUFFIX}")):
        target = args.outputs / (image.name[: -len(IMAGE_SUFFIX)] + ".nii.gz")
        shutil.copyfile(image, target.with_name(target.name + ".partial"))
        os.replace(target.with_name(target.name + ".partial"), target)
    if args.report:
        args.report.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
