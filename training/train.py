"""Train the localization net or the SCN; resumable; exports EMA weights for app/.

    python -m training.train --stage segmentation --run runs/scn --generated 60 \
        --data ../shared/data --iterations 3000 --export weights

Samples are prepared and augmented by a tf.data pipeline whose parallel map calls run the NumPy /
SimpleITK augmentation (SimpleITK releases the GIL) while the network trains. With several devices
(``--devices``, or more than one visible GPU) a tf.distribute.MirroredStrategy runs one sample per
device and averages the gradients. Each run folder holds a checkpoint (weights, optimizer, EMA,
iteration, random state), a CSV log and the cache of prepared cases.
"""

import argparse
import csv
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from app import method

STAGES = method.NETWORKS  # one stage trains one network
PRECISIONS = ("float32", "bfloat16", "float16")
# float16 loss scaling halves the scale on each overflow: 40 in a row means it is not the scale
MAX_OVERFLOWS_IN_A_ROW = 40


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--run", type=Path, required=True, help="run folder (checkpoint, log)")
    parser.add_argument("--data", type=Path, action="append", default=[],
                        help="folder of labelled CT (FLARE naming or imagesTr/labelsTr); "
                             "repeatable; a labelled.json or dataset.json in it may declare "
                             "cases whose labels cover only some organs (training/coverage.py)")
    parser.add_argument("--splits", type=Path, default=None,
                        help="k-fold splits file (training.splits); --data cases are then split "
                             "into training and held-out validation cases by --fold")
    parser.add_argument("--fold", type=int, default=0, help="fold of --splits to train")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder of prepared cases, shareable between runs "
                             "(default: RUN/cache)")
    parser.add_argument("--data-weight", type=float, nargs="+", default=[0.2],
                        metavar="SHARE",
                        help="share of samples drawn from --data cases (rest: generated), "
                             "each case as often as another; or one share per --data folder, "
                             "in their order, each folder's cases drawn evenly within its share "
                             "(e.g. a fully labelled folder more often than a liver-only one)")
    parser.add_argument("--generated", type=int, default=40, help="generated training cases")
    parser.add_argument("--generated-size", type=int, default=256,
                        help="in-plane voxels of generated training cases")
    parser.add_argument("--validation", type=int, default=3, help="generated validation cases")
    parser.add_argument("--anatomy", type=Path, default=None,
                        help="label maps of real patients (a folder, e.g. ../shared/anatomy): "
                             "rendered as CT by synthetic.anatomy; about 15%% of the patients "
                             "are held out and rendered for validation")
    parser.add_argument("--anatomy-cases", type=int, default=120,
                        help="rendered training cases of real anatomy (maps taken in turn, each "
                             "rendering augmented and drawn anew)")
    parser.add_argument("--anatomy-first-case", type=int, default=0, metavar="K",
                        help="index of the first rendered real-anatomy training case: cases K "
                             "to K + N - 1 (N = --anatomy-cases) are rendered, case i from map "
                             "i mod the map count with its own seed, so K = the map count draws "
                             "a second rendering of every map (new appearance and deformation)")
    parser.add_argument("--anatomy-weight", type=float, default=0.5,
                        help="share of training samples from rendered real anatomy")
    parser.add_argument("--pseudo", type=Path, action="append", default=[],
                        help="folder of pseudo-labelled CT written by training.pseudo_label; "
                             "repeatable; its ignore masks leave uncertain voxels out of the "
                             "losses")
    parser.add_argument("--pseudo-weight", type=float, default=0.2,
                        help="share of training samples from --pseudo cases")
    parser.add_argument("--iterations", type=int, default=1000, help="total iterations")
    parser.add_argument("--crop-size", type=int, nargs=3, default=(64, 64, 64),
                        metavar=("Z", "Y", "X"),
                        help="training crop: SCN crop size (multiples of 32); largest "
                             "localization crop")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="Adam learning rate (default: 1e-4 SCN, 1e-5 localization)")
    parser.add_argument("--warm-up", type=int, default=0, metavar="ITERATIONS",
                        help="raise the learning rate linearly from 0 over the run's first "
                             "ITERATIONS steps (a fine-tune's fresh Adam state takes full-size "
                             "steps from its first moments otherwise)")
    parser.add_argument("--decay", type=int, nargs=2, default=None, metavar=("FROM", "TO"),
                        help="cosine decay of the learning rate from the run's iteration FROM "
                             "to TO, down to --final-learning-rate, held there after TO")
    parser.add_argument("--final-learning-rate", type=float, default=None,
                        help="the learning rate that --decay ends at")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="mixed precision: bfloat16 is faster on CPUs with AVX512-BF16 but "
                             "gave NaN gradients in the localization net here; float16 (for GPUs) "
                             "trains with dynamic loss scaling")
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-weights", type=Path, default=None,
                        help="start a new run from this weights folder (e.g. the shipped weights)")
    parser.add_argument("--export", type=Path, default=None,
                        help="write the EMA weights into this weights folder at the end")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="every N iterations write the EMA weights as a complete weights "
                             "folder RUN/snapshots/ITERATION (the other network and weights.json "
                             "from --init-weights), for averaging and for scoring while the run "
                             "goes on; 0: none")
    parser.add_argument("--image-quality", type=float, default=0.0, metavar="P",
                        help="share of samples shown as another scanner would show them: thicker "
                             "slices, a softer kernel and more noise drawn anew per sample "
                             "(training.augment.scanner_quality); 0: none, and the samples are "
                             "those of a run without this option")
    parser.add_argument("--workers", type=int, default=2,
                        help="parallel sample preparations in the tf.data pipeline")
    parser.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                        help="train on these devices with tf.distribute.MirroredStrategy, one "
                             "sample each per iteration (e.g. /gpu:0 /gpu:1); default: every GPU "
                             "when there are several, else the one default device")
    args = parser.parse_args(argv)
    if len(args.data_weight) not in (1, len(args.data)):
        parser.error(f"--data-weight: {len(args.data_weight)} shares for {len(args.data)} "
                     "--data folders: give one share in all or one per folder")
    if any(share < 0 for share in args.data_weight) or sum(args.data_weight) > 1:
        parser.error(f"--data-weight: shares {args.data_weight} must be >= 0 and sum to <= 1")
    if args.anatomy_first_case < 0:
        parser.error(f"--anatomy-first-case: {args.anatomy_first_case}, must be >= 0")
    if not 0 <= args.image_quality <= 1:
        parser.error(f"--image-quality: {args.image_quality}, must be a share in [0, 1]")
    if args.warm_up < 0:
        parser.error(f"--warm-up: {args.warm_up} iterations, must be >= 0")
    if (args.decay is None) != (args.final_learning_rate is None):
        parser.error("--decay and --final-learning-rate go together")
    if args.decay is not None:
        first, last = args.decay
        if not args.warm_up <= first < last:
            parser.error(f"--decay {first} {last}: needs --warm-up ({args.warm_up}) <= FROM < TO")
        if args.final_learning_rate < 0:
            parser.error(f"--final-learning-rate: {args.final_learning_rate}, must be >= 0")
    return args


def scheduled_learning_rate(step, rate, warm_up=0, decay=None, final_rate=None):
    """The learning rate of the run's training step ``step`` (0 for its first): linear warm-up
    to ``rate`` over ``warm_up`` steps, ``rate`` until ``decay[0]``, a half cosine down to
    ``final_rate`` at ``decay[1]``, ``final_rate`` after."""
    if step < warm_up:
        return rate * (step + 1) / warm_up
    if decay is None or step < decay[0]:
        return rate
    first, last = decay
    if step >= last:
        return final_rate
    return final_rate + (rate - final_rate) * 0.5 * (1.0 + math.cos(math.pi * (step - first)
                                                                     / (last - first)))


GENERATED_SEED_OFFSET = {"train": 1_000_000, "validation": 2_000_000}
ANATOMY_SEED_OFFSET = {"train": 3_000_000, "validation": 4_000_000}


def anatomy_split(folder):
    """(training map paths, held-out map paths) of a label-map folder, split by patient."""
    from synthetic.anatomy import held_out, list_maps

    maps = list_maps(folder)
    kept_out = held_out(maps)
    return ([m for m in maps if m.name.split(".")[0] not in kept_out],
            [m for m in maps if m.name.split(".")[0] in kept_out])


def prepare_cases(args):
    """(training cases from --data, generated training cases, validation cases, rendered
    real-anatomy training cases).

    With ``--splits``, the --data cases of the fold's validation set join the generated
    validation cases, and cases named in neither set of the fold are left out. A --data case
    covers the organs its folder's declaration names (all when undeclared); the declaration
    wins over a cached case's coverage.
    """
    from training.cases import case_coverage, covering, find_cases, load_case, prepare_case
    from training.store import cached

    cache = args.cache or args.run / "cache"

    def generated(split, index):
        from synthetic import generate_case

        seed = GENERATED_SEED_OFFSET[split] + index
        name = f"generated_{split}_{index:04d}"
        return cached(cache, name, lambda: prepare_case(
            name, *generate_case(seed, in_plane_size=args.generated_size)), args.stage)

    found = [case for folder in args.data for case in find_cases(folder)]
    coverage = {name: covered for folder in args.data
                for name, covered in case_coverage(folder).items()}
    training_names = {name for name, _, _ in found}
    held_out_names = set()
    if args.splits:
        from training.splits import fold_of

        training_names, held_out_names = fold_of(args.splits, args.fold)
        missing = {name for name, _, _ in found} - training_names - held_out_names
        if missing:
            print(f"warning: {len(missing)} cases are not in {args.splits} and are left out: "
                  f"{', '.join(sorted(missing)[:5])}", flush=True)

    def real(names):
        cases = [cached(cache, name, lambda n=name, i=image, path=label: load_case(
                     n, i, path, coverage[n]), args.stage)
                 for name, image, label in found if name in names]
        return [covering(case, coverage[case.name]) for case in cases]

    anatomy_train, anatomy_validation = [], []
    if args.anatomy:
        from synthetic.anatomy import read_label_map, render_case

        maps, held_maps = anatomy_split(args.anatomy)

        def rendered(split, index, path):
            seed = ANATOMY_SEED_OFFSET[split] + index
            name = f"anatomy_{split}_{index:04d}_{path.name.split('.')[0]}"
            return cached(cache, name, lambda: prepare_case(name, *render_case(
                read_label_map(path), seed, in_plane_size=args.generated_size,
                augment=split == "train")), args.stage)

        first = args.anatomy_first_case
        anatomy_jobs = [("train", i, maps[i % len(maps)])
                        for i in range(first, first + args.anatomy_cases)]
        anatomy_jobs += [("validation", i, path) for i, path in enumerate(held_maps)]
    else:
        anatomy_jobs = []
    with ThreadPoolExecutor(args.workers) as pool:
        train = list(pool.map(lambda i: generated("train", i), range(args.generated)))
        validation = list(pool.map(lambda i: generated("validation", i), range(args.validation)))
        for (split, _, _), case in zip(anatomy_jobs, pool.map(lambda job: rendered(*job),
                                                               anatomy_jobs)):
            (anatomy_train if split == "train" else anatomy_validation).append(case)
    return (real(training_names), train, real(held_out_names) + anatomy_validation + validation,
            anatomy_train)


def prepare_pseudo_cases(args):
    """Training cases of the --pseudo folders (training.pseudo_label), with their ignore masks.

    Each is cached as ``pseudo_NAME_DIGEST``, DIGEST from the SHA-256 of its label and ignore
    files that pseudo_labels.json records: a later round's labels of the same image get a cache
    entry of their own. Each covers the organs the record says (``--plausible-only``). A case
    whose labels hold no organ cannot give a training ROI, and one that covers none teaches
    nothing: both are left out with a warning.
    """
    import hashlib

    from training.cases import covering, load_case
    from training.pseudo_label import read_folder
    from training.store import cached

    cache = args.cache or args.run / "cache"
    found = [case for folder in args.pseudo for case in read_folder(folder)]

    def prepared(name, image, labels, ignore, digests, covered):
        if not covered:
            print(f"warning: pseudo-labelled case left out: {name}: its labels cover no organ",
                  flush=True)
            return None
        key = hashlib.sha256((digests["labels"] + digests["ignore"]).encode()).hexdigest()[:16]
        try:
            case = cached(cache, f"pseudo_{name}_{key}", lambda: load_case(
                name, image, labels, ignore_path=ignore), args.stage)
        except ValueError as error:  # prepare_case: no organ voxels
            print(f"warning: pseudo-labelled case left out: {error}", flush=True)
            return None
        return covering(case, covered)  # the cache key is the files' content

    with ThreadPoolExecutor(args.workers) as pool:
        cases = list(pool.map(lambda case: prepared(*case), found))
    return [case for case in cases if case is not None]


def pick_pool(rng, real, anatomy, generated, data_weight, anatomy_weight, pseudo=(),
              pseudo_weight=0.0):
    """The source of one sample: pseudo-labelled CT with probability ``pseudo_weight``, real CT
    with ``data_weight``, rendered real anatomy with ``anatomy_weight``, generated CT otherwise
    (shares of absent sources go to the others). Without pseudo-labelled and anatomy cases the
    draws are those of earlier runs, so they resume alike."""
    if pseudo:
        if not (real or anatomy or generated) or pseudo_weight >= 1.0 or (
                rng.uniform() < pseudo_weight):
            return pseudo
        # the other shares are of all samples: of the samples left they are larger
        rest = 1.0 - pseudo_weight
        data_weight, anatomy_weight = data_weight / rest, anatomy_weight / rest
    if real and (not (generated or anatomy) or rng.uniform() < data_weight):
        return real
    if anatomy:
        rest = 1.0 - (data_weight if real else 0.0)
        if not generated or rng.uniform() * rest < anatomy_weight:
            return anatomy
    return generated


def folder_shares(folders, shares, real):
    """(probabilities, [cases]) per --data folder when each folder has its own share: the
    training cases ``real`` split by the folder their name was found in, each folder drawn with
    its share of the real samples; None for one share in all."""
    if len(shares) == 1:
        return None
    from training.cases import find_cases

    groups = []
    for folder, share in zip(folders, shares):
        names = {name for name, _, _ in find_cases(folder)}
        cases = [case for case in real if case.name in names]
        if share > 0 and not cases:
            raise ValueError(f"--data {folder}: share {share} but no training case")
        groups.append(cases)
    return np.asarray(shares) / sum(shares), groups


def pick_real_case(rng, real, groups):
    """One --data case: evenly among all, or (``groups`` from ``folder_shares``) a folder by its
    share, then evenly within it. One share in all draws as earlier runs did, so they resume
    alike."""
    if groups is None:
        return real[rng.integers(len(real))]
    probabilities, cases = groups
    folder = cases[rng.choice(len(cases), p=probabilities)]
    return folder[rng.integers(len(folder))]


def sample_dataset(make_sample, seed, workers, first_index=0, depth=6, with_coverage=False,
                   with_ignore=False):
    """Augmented training samples as an endless tf.data pipeline, in order, batches of one.

    Sample ``i`` is ``make_sample(rng)`` with a generator seeded by (seed, i), so the sequence does
    not depend on thread timing, and a run resumed at sample ``i`` sees exactly the samples an
    uninterrupted run would have seen. ``workers`` map calls run at once (deterministic order);
    ``depth`` batches are prefetched. Elements: image (1, z, y, x, 1) float32, labels (1, z, y, x)
    uint8; sizes vary for localization samples. ``with_coverage``: ``make_sample`` returns a
    third value, the case's coverage (training.coverage.coverage_vector), and the elements carry
    it as (1, classes) float32, for the train step's partial-label losses. ``with_ignore``:
    ``make_sample`` returns one more value after those, the sample's ignore mask (z, y, x) (1 =
    voxel left out of the losses), carried as (1, z, y, x) uint8.
    """
    import tensorflow as tf

    def make(index):
        image, labels, *extra = make_sample(np.random.default_rng([seed, int(index)]))
        coverage = [np.asarray(extra.pop(0), np.float32)] if with_coverage else []
        ignore = [np.asarray(extra.pop(0), np.uint8)] if with_ignore else []
        return (image.astype(np.float32, copy=False), labels.astype(np.uint8, copy=False),
                *coverage, *ignore)

    def load(index):
        types = ((tf.float32, tf.uint8) + ((tf.float32,) if with_coverage else ())
                 + ((tf.uint8,) if with_ignore else ()))
        image, labels, *extra = tf.numpy_function(make, [index], types, stateful=False)
        image.set_shape([None, None, None])
        labels.set_shape([None, None, None])
        if with_coverage:
            extra[0].set_shape([method.NUM_CLASSES])
        if with_ignore:
            extra[-1].set_shape([None, None, None])
        return (image[..., None], labels, *extra)

    return (tf.data.Dataset.counter(first_index)
            .map(load, num_parallel_calls=max(1, workers), deterministic=True)
            .batch(1)
            .prefetch(max(1, depth)))


def distribution_strategy(devices=None):
    """MirroredStrategy over ``devices``, or over every GPU when there are several; else the
    default (single-device) strategy."""
    import tensorflow as tf

    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [gpu.name for gpu in gpus] if len(gpus) > 1 else None
    if not devices:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices)


def set_precision(precision):
    """Keras' global dtype policy for ``precision`` (one of PRECISIONS); variables stay float32."""
    import keras

    keras.mixed_precision.set_global_policy(
        {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision])


def precision_warning(precision, on_gpu, cpu_has_bfloat16):
    """A line warning that ``precision`` will be slow on this machine, or None.

    bfloat16 on a CPU without native bfloat16 dot products is emulated: on an Intel Xeon with
    AVX512 but no AVX512_BF16, the SCN step took 5.0 s in bfloat16 against 1.6 s in float32
    (64^3 crops, docs/training.md, "Training speed").
    """
    if precision == "bfloat16" and not on_gpu and not cpu_has_bfloat16:
        return ("warning: this CPU has no native bfloat16 (AVX512_BF16 or AMX): bfloat16 is "
                "emulated and slower than float32 here; consider --precision float32")
    return None


def make_optimizer(learning_rate, precision):
    """Adam; wrapped for dynamic loss scaling in float16 (whose range is too small for the
    gradients of small losses)."""
    import keras

    optimizer = keras.optimizers.Adam(learning_rate)
    if precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def manager_has_checkpoint(run):
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(run / "checkpoints")) is not None


def main(argv=None):
    train(parse_args(argv))


def train(args: argparse.Namespace):
    """Trains one network as ``args`` (``parse_args``'s namespace) says: builds or resumes the run
    in ``args.run``, logs, checkpoints, snapshots and exports."""
    import keras
    import tensorflow as tf

    from app.networks import build_localization_net, build_scn
    from training import augment
    from training.coverage import coverage_vector
    from training.store import held_bytes
    from training.validation import validate

    args.run.mkdir(parents=True, exist_ok=True)
    (args.run / "args.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k in ("data", "pseudo")
             else v)
         for k, v in vars(args).items()}, indent=1))
    keras.utils.set_random_seed(args.seed)
    set_precision(args.precision)
    from app.precision import cpu_has_bfloat16

    warning = precision_warning(args.precision, bool(tf.config.list_physical_devices("GPU")),
                                cpu_has_bfloat16())
    if warning:
        print(warning, flush=True)
    segmentation = args.stage == "segmentation"
    strategy = distribution_strategy(args.devices)
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        model = build_scn() if segmentation else build_localization_net()
        learning_rate = args.learning_rate or (1e-4 if segmentation else 1e-5)
        optimizer = make_optimizer(learning_rate, args.precision)
        optimizer.build(model.trainable_variables)
        if args.init_weights and not manager_has_checkpoint(args.run):
            from app.weights import LOCALIZATION_WEIGHTS, SEGMENTATION_WEIGHTS

            model.load_weights(args.init_weights / (SEGMENTATION_WEIGHTS if segmentation
                                                    else LOCALIZATION_WEIGHTS))
        ema = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
        iteration = tf.Variable(0, dtype=tf.int64)
        mean_gradient_norm = tf.Variable(0.0)
    if replicas > 1:
        print(f"{replicas} replicas ({', '.join(strategy.extended.worker_devices)}), "
              f"one sample each per iteration", flush=True)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, ema=ema,
                                     iteration=iteration, mean_gradient_norm=mean_gradient_norm)
    manager = tf.train.CheckpointManager(checkpoint, args.run / "checkpoints", max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"resumed from {manager.latest_checkpoint} at iteration {int(iteration.numpy())}")
        if args.learning_rate:  # an explicit rate overrides the checkpoint's
            optimizer.learning_rate.assign(args.learning_rate)

    start_time = time.time()
    real, generated, validation, anatomy = prepare_cases(args)
    pseudo = prepare_pseudo_cases(args) if args.pseudo else []
    real_groups = folder_shares(args.data, args.data_weight, real)
    held = held_bytes(real + anatomy + generated + pseudo + validation)
    print(f"{len(real)} real + {len(anatomy)} real-anatomy + {len(generated)} generated "
          + (f"+ {len(pseudo)} pseudo-labelled " if args.pseudo else "")
          + f"training cases, {len(validation)} validation cases, "
          f"{held / 1e6:,.0f} MB of images in memory ({time.time() - start_time:.0f} s)",
          flush=True)
    # Ignore masks travel with the samples only when some case has one: other runs keep the
    # pipeline and train step they had; a case without one then gets an all-zero mask, which
    # gives the losses it had (training/losses.py).
    with_ignore = bool(pseudo)

    ranges = augment.AugmentationRanges(quality_probability=args.image_quality)

    def make_sample(rng):
        pool = pick_pool(rng, real, anatomy, generated, sum(args.data_weight),
                         args.anatomy_weight, pseudo, args.pseudo_weight)
        case = (pick_real_case(rng, real, real_groups) if pool is real
                else pool[rng.integers(len(pool))])
        if segmentation:
            image, labels, *ignore = augment.segmentation_sample(
                case, rng, args.crop_size, ranges, with_ignore=with_ignore)
        else:
            image, labels, *ignore = augment.localization_sample(
                case, rng, ranges, max_size_zyx=args.crop_size, with_ignore=with_ignore)
        return (image, labels, coverage_vector(case.covered), *ignore)

    train_step = make_train_step(model, optimizer, ema, iteration, mean_gradient_norm,
                                 segmentation, args.ema_decay, strategy)

    log_path = args.run / "log.csv"
    new_log = not log_path.exists()
    log = open(log_path, "a", newline="")
    writer = csv.writer(log)
    if new_log:
        writer.writerow(["iteration", "loss", "seconds", "validation"])
    # iteration i trains on samples i * replicas ... (i + 1) * replicas - 1, one per replica
    step = int(iteration.numpy())
    samples = iter(strategy.distribute_datasets_from_function(
        lambda _: sample_dataset(make_sample, args.seed, args.workers,
                                 first_index=step * replicas, with_coverage=True,
                                 with_ignore=with_ignore)))
    losses_window = []
    tick = time.time()
    try:
        from tqdm import tqdm
        progress = tqdm(total=args.iterations, initial=step, unit="it", mininterval=5)
        skipped = overflows_in_a_row = 0
        if step == 0 and validation:
            # The starting weights' scores: what the run's later validations are measured against.
            scores = json.dumps(validate(model, ema, validation, args.stage))
            progress.write(f"iteration 0: validation {scores}")
            writer.writerow([0, "", 0.0, scores])
            log.flush()
        scheduled = args.warm_up or args.decay
        while step < args.iterations:
            if scheduled:
                optimizer.learning_rate.assign(scheduled_learning_rate(
                    step, learning_rate, args.warm_up, args.decay, args.final_learning_rate))
            loss, norm = train_step(*next(samples))
            loss, norm, step = float(loss), float(norm), int(iteration.numpy())
            # float16: an overflowing gradient skips the step and halves the loss scale
            overflow = args.precision == "float16" and np.isfinite(loss) and not np.isfinite(norm)
            skipped += overflow
            overflows_in_a_row = overflows_in_a_row + 1 if overflow else 0
            if not np.isfinite(loss) or not (np.isfinite(norm) or overflow) or (
                    overflows_in_a_row > MAX_OVERFLOWS_IN_A_ROW):
                raise FloatingPointError(f"iteration {step}: loss {loss}, "
                                         f"gradient norm {norm}, {overflows_in_a_row} "
                                         f"float16 overflows in a row")
            losses_window.append(loss)
            progress.update(1)
            validation_scores = ""
            if validation and (step % args.validate_every == 0 or step == args.iterations):
                scores = validate(model, ema, validation, args.stage)
                validation_scores = json.dumps(scores)
                progress.write(f"iteration {step}: validation {validation_scores}")
            if step % 20 == 0 or validation_scores:
                writer.writerow([step, round(float(np.mean(losses_window)), 5),
                                 round(time.time() - tick, 1), validation_scores])
                log.flush()
                progress.set_postfix(loss=f"{np.mean(losses_window):.4f}",
                                     **({"skipped": skipped} if skipped else {}))
                losses_window = []
            if step % args.checkpoint_every == 0 or step == args.iterations:
                manager.save()
            if args.snapshot_every and step % args.snapshot_every == 0:
                write_snapshot(ema, args, step)
        progress.close()
    finally:
        del samples  # ends the pipeline's map calls before the interpreter exits
        log.close()
    if args.export:
        export_weights(ema, args.stage, args.export)


def make_train_step(model, optimizer, ema, iteration, mean_gradient_norm, segmentation, ema_decay,
                    strategy=None):
    """A compiled step: loss, gradients clipped to 5x their running mean norm, Adam, EMA update.

    Returns ``step(image, labels, coverage=None, ignore=None) -> (loss, gradient norm)``:
    image (1, z, y, x, 1), labels (1, z, y, x) per replica; ``coverage`` (1, 5) float, the
    sample's covered organs (training.coverage.coverage_vector; None: all, the method's losses)
    for the partial-label losses of training/losses.py; ``ignore`` (1, z, y, x), 1 at voxels
    the losses leave out (a pseudo-labelled sample's uncertain voxels; None: none). With a
    ``keras.optimizers.LossScaleOptimizer`` (float16) the loss is scaled before differentiation,
    the norm and clipping act on the unscaled gradients, and a step whose gradients overflow
    returns a non-finite norm and changes no weight (the optimizer halves its scale). Under a
    distribution ``strategy`` each replica computes the loss and gradients of its own sample; the
    losses and gradients are averaged across replicas, and clipping, Adam and the EMA act once on
    the averages (cross-replica context), so N devices train as one device would on the mean
    gradient of N samples.
    """
    import keras
    import tensorflow as tf

    from training import losses

    strategy = strategy or tf.distribute.get_strategy()
    classes = method.NUM_CLASSES if segmentation else 2
    # float16: the loss is multiplied by the optimizer's dynamic scale before differentiation
    loss_scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def replica_gradients(image, labels, coverage=None, ignore=None):
        one_hot = tf.one_hot(tf.cast(labels, tf.int32), classes)
        known = None if ignore is None else 1.0 - tf.cast(ignore, tf.float32)[..., None]
        with tf.GradientTape() as tape:
            outputs = model(image, training=True)
            loss = (losses.scn_loss(outputs, one_hot, coverage, known) if segmentation
                    else losses.localization_loss(outputs, one_hot, coverage, known))
            total = loss + tf.add_n([tf.cast(term, tf.float32) for term in model.losses])
            if loss_scaling:
                total = optimizer.scale_loss(total)
        return loss, tape.gradient(total, model.trainable_variables)

    def mean(per_replica):
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    @tf.function(reduce_retracing=True)
    def train_step(image, labels, coverage=None, ignore=None):
        if ignore is not None and coverage is None:  # all covered: the method's losses
            coverage = tf.ones([tf.shape(labels)[0], method.NUM_CLASSES])
        inputs = (image, labels) + ((coverage,) if coverage is not None else ()) + (
            (ignore,) if ignore is not None else ())
        loss, gradients = strategy.run(replica_gradients, args=inputs)
        loss, gradients = mean(loss), [mean(g) for g in gradients]
        scale = tf.cast(optimizer.dynamic_scale, tf.float32) if loss_scaling else 1.0
        scaled_norm = tf.linalg.global_norm(gradients)
        norm = scaled_norm / scale
        finite = tf.math.is_finite(norm)
        # clip to 5x the running mean of the gradient norm (none before the mean exists)
        limit = tf.where(mean_gradient_norm > 0, 5.0 * mean_gradient_norm, norm + 1.0)
        clipped, _ = tf.clip_by_global_norm(gradients, limit * scale, use_norm=scaled_norm)
        if loss_scaling:  # an overflow passes unclipped: the optimizer skips it, halves its scale
            clipped = [tf.where(finite, c, g) for c, g in zip(clipped, gradients)]
        optimizer.apply_gradients(zip(clipped, model.trainable_variables))
        running = tf.where(mean_gradient_norm > 0,
                           0.99 * mean_gradient_norm + 0.01 * tf.minimum(norm, limit), norm)
        mean_gradient_norm.assign(tf.where(finite, running, mean_gradient_norm))
        steps = tf.cast(iteration, tf.float32)
        decay = tf.minimum(ema_decay, (1.0 + steps) / (10.0 + steps))
        for average, variable in zip(ema, model.trainable_variables):
            average.assign(decay * average + (1.0 - decay) * variable)
        iteration.assign_add(1)
        return loss, norm

    return train_step


def write_snapshot(ema, args, step):
    """RUN/snapshots/ITERATION: a complete weights folder app/ can load (release.import_weights'
    folder writer: temporary name, then rename). The other network and weights.json come from
    --init-weights (the shipped weights without it); the init's scores are dropped, as they are
    not the snapshot's."""
    from app.weights import DEFAULT_WEIGHTS_DIR, read_provenance
    from release.weights_folder import write_folder

    source = args.init_weights or DEFAULT_WEIGHTS_DIR
    provenance = read_provenance(source)
    provenance.pop("scores", None)
    entry = provenance.get(args.stage)
    entry = dict(entry) if isinstance(entry, dict) else {}
    entry["snapshot"] = {"run": str(args.run), "iteration": step}
    provenance[args.stage] = entry
    write_folder(args.run / "snapshots" / f"{step:06d}", {args.stage: ema_model(ema, args.stage)},
                 provenance, source, [])


def ema_model(ema, stage):
    """A float32 network of ``stage`` holding the EMA values; training's precision policy is
    restored afterwards."""
    import keras

    from app.networks import BUILDERS

    training_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        fresh = BUILDERS[stage]()
    finally:
        keras.mixed_precision.set_global_policy(training_policy)
    for target, average in zip(fresh.trainable_variables, ema):
        target.assign(average)
    return fresh


def export_weights(ema, stage, weights_dir):
    """Write the EMA values into ``weights_dir`` as the weights file app/ loads (atomically)."""
    from app.weights import WEIGHTS_FILES

    weights_dir.mkdir(parents=True, exist_ok=True)
    name = WEIGHTS_FILES[stage]
    temporary = weights_dir / f"partial_{name}"
    ema_model(ema, stage).save_weights(temporary)
    temporary.replace(weights_dir / name)
    print(f"exported EMA weights to {weights_dir / name}")


if __name__ == "__main__":
    main()
