"""Training speed on this machine: network steps per second per stage and precision, and the
throughput of the augmentation pipeline alone (which must outpace the network).

    PYTHONPATH=. .venv/bin/python -m training.benchmark [--steps 10] [--samples 20]

The network step is the real one of training/train.py (loss, clipping, Adam, EMA) on a crop of the
training size; its content does not change the arithmetic. The pipeline draws augmented samples
from generated cases with the same threads as training.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=["localization", "segmentation"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--crop-size", type=int, nargs=3, default=(64, 64, 64), metavar=("Z", "Y", "X"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    parser.add_argument("--samples", type=int, default=20, help="timed augmented samples per stage")
    parser.add_argument("--workers", type=int, default=2, help="sampling threads, as in training")
    parser.add_argument("--cache", type=Path, default=None,
                        help="prepared-case cache to reuse (default: a temporary folder)")
    return parser.parse_args(argv)


def network_seconds_per_step(stage, precision, crop_size_zyx, steps):
    """Mean wall seconds of one training step (after two warm-up steps)."""
    import keras
    import tensorflow as tf

    from app.networks import build_localization_net, build_scn
    from training.train import make_train_step

    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
    try:
        segmentation = stage == "segmentation"
        model = build_scn() if segmentation else build_localization_net()
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(model.trainable_variables)
        ema = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
        step = make_train_step(model, optimizer, ema, tf.Variable(0, dtype=tf.int64),
                               tf.Variable(0.0), segmentation, 0.999)
        rng = np.random.default_rng(0)
        image = rng.uniform(-0.5, 0.5, (1, *crop_size_zyx, 1)).astype(np.float32)
        labels = rng.integers(0, 5 if segmentation else 2, (1, *crop_size_zyx)).astype(np.uint8)
        for _ in range(2):
            loss, _ = step(image, labels)
        start = time.perf_counter()
        for _ in range(steps):
            loss, _ = step(image, labels)
        float(loss)
        return (time.perf_counter() - start) / steps, bool(np.isfinite(float(loss)))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def pipeline_samples_per_second(stage, cases, crop_size_zyx, samples, workers):
    """Augmented samples per second with ``workers`` threads (as training draws them)."""
    from training import augment
    from training.train import SampleStream

    def make_sample(rng):
        case = cases[rng.integers(len(cases))]
        if stage == "segmentation":
            return augment.segmentation_sample(case, rng, crop_size_zyx)
        return augment.localization_sample(case, rng, max_size_zyx=crop_size_zyx)

    stream = SampleStream(make_sample, seed=0, workers=workers, depth=workers)
    try:
        stream.next()  # threads started and warm
        start = time.perf_counter()
        for _ in range(samples):
            stream.next()
        return samples / (time.perf_counter() - start)
    finally:
        stream.close()


def prepared_cases(cache, count=2):
    from synthetic import generate_case
    from training.cases import prepare_case
    from training.store import cached

    return [cached(cache, f"benchmark_{seed}", lambda s=seed: prepare_case(
        f"benchmark_{s}", *generate_case(5_000_000 + s, in_plane_size=256))) for seed in range(count)]


def main(argv=None):
    args = parse_args(argv)
    import os

    print(f"CPU cores: {os.cpu_count()}; crop {tuple(args.crop_size)} (z, y, x)")
    print("| stage | precision | s / step | steps / s | finite loss |")
    print("|---|---|---|---|---|")
    for stage in args.stages:
        for precision in args.precisions:
            seconds, finite = network_seconds_per_step(stage, precision, args.crop_size, args.steps)
            print(f"| {stage} | {precision} | {seconds:.2f} | {1 / seconds:.2f} | {finite} |",
                  flush=True)
    with tempfile.TemporaryDirectory() as temporary:
        cases = prepared_cases(args.cache or Path(temporary))
        print(f"\n| stage | augmented samples / s ({args.workers} threads) |")
        print("|---|---|")
        for stage in args.stages:
            rate = pipeline_samples_per_second(stage, cases, args.crop_size, args.samples, args.workers)
            print(f"| {stage} | {rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
