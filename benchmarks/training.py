"""Training speed on this machine: network steps per second per stage and precision, and the
throughput of the augmentation pipeline alone (which must outpace the network).

    PYTHONPATH=. .venv/bin/python -m benchmarks.training [--steps 10] [--samples 20] [--no-network]
        [--image-quality P]

The network step is the real one of training/train.py (loss, clipping, Adam, EMA) on a crop of the
training size; its content does not change the arithmetic. The pipeline draws augmented samples
from generated cases through the same tf.data pipeline as training; those not yet in
``--cache`` (all, without it) are generated and prepared first, and the seconds per case printed.
"""

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from training.train import PRECISIONS, STAGES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=PRECISIONS, help="float16 (loss scaling) is meant for GPUs")
    parser.add_argument("--crop-size", type=int, nargs=3, default=(64, 64, 64),
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    parser.add_argument("--samples", type=int, default=20, help="timed augmented samples per stage")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel map calls of the pipeline, as in training")
    parser.add_argument("--image-quality", type=float, default=0.0, metavar="P",
                        help="share of samples with another scanner's image quality, as "
                             "training.train's option (its cost is in the pipeline's rate)")
    parser.add_argument("--no-network", dest="network", action="store_false",
                        help="skip the network steps: case preparation and the pipeline only")
    parser.add_argument("--cache", type=Path, default=None,
                        help="prepared-case cache to reuse (default: a temporary folder)")
    return parser.parse_args(argv)


def network_seconds_per_step(stage, precision, crop_size_zyx, steps):
    """Mean wall seconds of one training step (after two warm-up steps)."""
    import keras
    import tensorflow as tf

    from app.networks import build_localization_net, build_scn
    from training.train import make_optimizer, make_train_step, set_precision

    set_precision(precision)
    try:
        segmentation = stage == "segmentation"
        model = build_scn() if segmentation else build_localization_net()
        optimizer = make_optimizer(1e-4, precision)
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


def pipeline_samples_per_second(stage, cases, crop_size_zyx, samples, workers, image_quality=0.0):
    """Augmented samples per second from the training tf.data pipeline with ``workers`` parallel
    map calls, drawn as fast as it delivers them (no network step in between); ``image_quality``
    as training.train's ``--image-quality``."""
    from training import augment
    from training.train import sample_dataset

    ranges = augment.AugmentationRanges(quality_probability=image_quality)

    def make_sample(rng):
        case = cases[rng.integers(len(cases))]
        if stage == "segmentation":
            return augment.segmentation_sample(case, rng, crop_size_zyx, ranges)
        return augment.localization_sample(case, rng, ranges, max_size_zyx=crop_size_zyx)

    iterator = iter(sample_dataset(make_sample, seed=0, workers=workers, depth=workers))
    try:
        next(iterator)  # pipeline started and warm
        start = time.perf_counter()
        for _ in range(samples):
            next(iterator)
        return samples / (time.perf_counter() - start)
    finally:
        del iterator


def prepared_cases(cache, count=2):
    """``count`` generated training cases, prepared into ``cache`` unless already there, and the
    seconds per case of generating and of preparing (as training/train.py does) those that were
    not (two lists, empty when every case came from the cache)."""
    from synthetic import generate_case
    from training.cases import prepare_case
    from training.store import cached

    generating, preparing = [], []

    def generate_and_prepare(seed):
        start = time.perf_counter()
        image, labels = generate_case(5_000_000 + seed, in_plane_size=256)
        generating.append(time.perf_counter() - start)
        start = time.perf_counter()
        case = prepare_case(f"benchmark_{seed}", image, labels)
        preparing.append(time.perf_counter() - start)
        return case

    cases = [cached(cache, f"benchmark_{seed}", lambda s=seed: generate_and_prepare(s))
             for seed in range(count)]
    return cases, generating, preparing


def main(argv=None):
    args = parse_args(argv)
    import os

    print(f"CPU cores: {os.cpu_count()}; crop {tuple(args.crop_size)} (z, y, x)")
    if args.network:
        print("| stage | precision | s / step | steps / s | finite loss |")
        print("|---|---|---|---|---|")
        for stage, precision in itertools.product(args.stages, args.precisions):
            seconds, finite = network_seconds_per_step(stage, precision, args.crop_size, args.steps)
            print(f"| {stage} | {precision} | {seconds:.2f} | {1 / seconds:.2f} | {finite} |",
                  flush=True)
    with tempfile.TemporaryDirectory() as temporary:
        cases, generating, preparing = prepared_cases(args.cache or Path(temporary))
        if preparing:
            print(f"\nper generated case (256 x 256 in plane), {len(preparing)} cases: generation "
                  f"{np.mean(generating):.2f} s, preparation for training "
                  f"{np.mean(preparing):.2f} s")
        print(f"\n| stage | augmented samples / s ({args.workers} parallel calls, image quality "
              f"{args.image_quality}) |")
        print("|---|---|")
        for stage in args.stages:
            rate = pipeline_samples_per_second(stage, cases, args.crop_size, args.samples,
                                               args.workers, args.image_quality)
            print(f"| {stage} | {rate:.2f} |", flush=True)


if __name__ == "__main__":
    main()
