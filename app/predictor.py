"""The whole method as one straight line: read -> canonical -> localize -> crop -> segment ->
paste -> original orientation. ``Predictor`` loads both networks once, then segments any number
of images.

TensorFlow is imported by the ``Predictor``'s loading thread, not by this module: a process
that segments one case reads and prepares its image while TensorFlow starts.
"""

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from app import graphs, method
from app.geometry import Grid, from_canonical, to_canonical
from app.localization import localization_grid, partial_fov_axes, roi_from_foreground
from app.precision import build_networks, check_precision, default_precision
from app.preprocessing import crop_margin_mm, extend_partial_axes, network_input
from app.segmentation import drop_islands, labels_on_roi, paste, segmentation_grid
from app.weights import (DEFAULT_WEIGHTS_DIR, LOCALIZATION_WEIGHTS, SEGMENTATION_WEIGHTS,
                         read_provenance, read_settings)


@dataclass
class CaseResult:
    """Labels on the input grid and what happened on the way."""

    labels: sitk.Image
    roi_index: dict
    roi_mm: dict
    localization_spacing_mm: float
    segmentation_spacing_mm: float
    crop_size: tuple
    seconds: dict


class Predictor:
    """Both networks with their weights, loaded once; ``predict`` segments one CT image.

    ``precision``: "float32" or "bfloat16" for the networks (default ``default_precision()``).
    The networks run as plain TensorFlow graphs over the weight arrays (app/graphs.py).
    ``plain=True`` is the reference way instead: the Keras models, and step-by-step
    preprocessing and resampling back (SimpleITK filters on full-resolution intermediates);
    the fast path's labels are tested against it.

    The constructor reads and checks both weights files (a bad file raises ``ValueError`` here)
    and returns; a background thread imports TensorFlow, builds one graph per network for all
    input sizes and, with ``warm_up=True``, runs each once on its smallest valid input, the
    localization network first. That is seconds of mostly Python work, done while the caller
    reads and prepares its first image. Each network's first call waits for it; ``predict``
    reports the waits as ``localization_warm_up`` and ``segmentation_warm_up`` seconds.
    ``warm_up=False`` loads in the constructor and runs nothing.

    ``min_island_fraction``: after the argmax, an organ's connected pieces smaller than this
    fraction of its largest piece become background unless they touch the image's edge
    (``segmentation.drop_islands``; default ``method.MIN_ISLAND_FRACTION``, rule R-islands2 in
    weights/MODEL_CARD.md); 0 keeps the argmax as it is, as the paper does.
    """

    def __init__(self, weights_dir=DEFAULT_WEIGHTS_DIR, precision=None, plain=False,
                 warm_up=True, min_island_fraction=method.MIN_ISLAND_FRACTION):
        weights_dir = Path(weights_dir)
        if not 0.0 <= min_island_fraction <= 1.0:
            raise ValueError(f"min_island_fraction {min_island_fraction} is not between 0 and 1")
        self.min_island_fraction = min_island_fraction
        self.weights_dir = weights_dir
        paths = {"localization": weights_dir / LOCALIZATION_WEIGHTS,
                 "segmentation": weights_dir / SEGMENTATION_WEIGHTS}
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: weights file missing")
        if precision is not None:
            check_precision(precision)
        self.provenance = read_provenance(weights_dir)
        self.settings = read_settings(weights_dir)
        self.plain = plain
        self._requested_precision = precision
        self._precision = None
        self._values = {network: graphs.read_weights(path, network)
                        for network, path in paths.items()}
        self._networks = {}
        # per network: set once its graph exists (and, with a warm-up, has run once)
        self._ready = {"localization": threading.Event(), "segmentation": threading.Event()}
        self._load_error = None  # loading failed: every call raises it
        self._warm_up_errors = {}  # a warm-up run failed: that network's next call raises it
        if warm_up:
            # not a daemon: the interpreter waits for it at exit rather than tearing TensorFlow
            # down under a running trace
            threading.Thread(target=self._load, args=(True,), name="predictor-load").start()
        else:
            self._load(False)
            if self._load_error is not None:
                raise self._load_error

    @property
    def precision(self):
        """The networks' precision (waits for the loading thread to decide it)."""
        self._ready["localization"].wait()
        if self._load_error is not None:
            raise self._load_error
        return self._precision

    def _load(self, warm_up):
        """Import TensorFlow, make both networks' graphs, warm each up (loading thread)."""
        try:
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                # allocate GPU memory as needed, not all of it up front (organisers sample it)
                tf.config.experimental.set_memory_growth(gpu, True)
            self._precision = self._requested_precision or default_precision()
            volume = tf.TensorSpec([1, None, None, None, 1], tf.float32)
            # One graph each for all input sizes (the valid sizes are the buckets): tracing per
            # size would cost a second per case; a new size costs only its kernels' set-up.
            if self.plain:
                localization_net, scn = build_networks(self._precision)
                localization_net.load_weights(self.weights_dir / LOCALIZATION_WEIGHTS)
                scn.load_weights(self.weights_dir / SEGMENTATION_WEIGHTS)
                localization = lambda x: localization_net(x, training=False)  # noqa: E731
                segmentation = lambda x: scn(x, training=False)["probabilities"]  # noqa: E731
            else:
                dtype = {"float32": tf.float32, "bfloat16": tf.bfloat16}[self._precision]
                localization_weights = graphs.Weights(self._values["localization"], dtype)
                segmentation_weights = graphs.Weights(self._values["segmentation"], dtype)
                localization = lambda x: graphs.localization_logits(  # noqa: E731
                    x, localization_weights)
                segmentation = lambda x: graphs.scn_probabilities(  # noqa: E731
                    x, segmentation_weights)
            self._values = None  # the tensors (or Keras variables) hold the weights now
            self._networks["localization"] = tf.function(
                lambda x: tf.argmax(localization(x), axis=-1) == 1, input_signature=[volume],
                autograph=False)
            self._networks["segmentation"] = tf.function(
                segmentation, input_signature=[volume], autograph=False)
        except Exception as error:  # raised by every network call
            self._load_error = error
            for event in self._ready.values():
                event.set()
            return
        if not warm_up:
            for event in self._ready.values():
                event.set()
            return
        smallest = {
            "localization": (min(method.LOCALIZATION_VALID_SIZES_Z),
                             min(method.LOCALIZATION_VALID_SIZES_XY),
                             min(method.LOCALIZATION_VALID_SIZES_XY)),
            "segmentation": (min(method.SEGMENTATION_VALID_SIZES_Z),
                             min(method.SEGMENTATION_VALID_SIZES_Y),
                             min(method.SEGMENTATION_VALID_SIZES_X)),
        }
        for name, shape_zyx in smallest.items():
            try:
                self._networks[name](np.zeros((1, *shape_zyx, 1), np.float32)).numpy()
            except Exception as error:  # raised by that network's first call
                self._warm_up_errors[name] = error
            finally:
                self._ready[name].set()

    def _network(self, name):
        """Network ``name``'s graph, once loaded (and warmed up); raises a loading error every
        time and a warm-up error once."""
        self._ready[name].wait()
        if self._load_error is not None:
            raise self._load_error
        error = self._warm_up_errors.pop(name, None)
        if error is not None:
            raise error
        return self._networks[name]

    def localization_input(self, canonical, loc_grid):
        """The localization network's input (z, y, x) float32, preprocessed as the weights need."""
        return network_input(canonical, loc_grid, self.settings.localization_sigma_mm,
                             method.PADDING_HU, self.settings.localization_downsampling,
                             plain=self.plain)

    def roi(self, loc_input, loc_grid, image_grid):
        """Stage 1 on a prepared input: the ROI (``Roi``, canonical image voxels)."""
        foreground = self._network("localization")(loc_input[None, ..., None]).numpy()[0]
        return roi_from_foreground(foreground, loc_grid, image_grid, network_input=loc_input)

    def localize(self, canonical):
        """Stage 1 alone on an image in canonical orientation: its ``Roi``."""
        grid = Grid.of(canonical)
        loc_grid = localization_grid(grid)
        return self.roi(self.localization_input(canonical, loc_grid), loc_grid, grid)

    def segmentation_input(self, canonical, roi):
        """(crop grid, scaled crop (z, y, x)) the SCN reads for ``roi`` of a canonical image."""
        grid = Grid.of(canonical)
        crop_grid = segmentation_grid(grid, roi)
        sigma_mm = self.settings.segmentation_sigma_mm
        source = extend_partial_axes(canonical, crop_grid, partial_fov_axes(grid),
                                     crop_margin_mm(grid, sigma_mm))
        return crop_grid, network_input(source, crop_grid, sigma_mm,
                                        self.settings.crop_padding_hu, plain=self.plain)

    def segmentation_probabilities(self, crop):
        """Stage 2 on a prepared crop (``segmentation_input``): the SCN's class probabilities,
        float32 (z, y, x, classes)."""
        return self._network("segmentation")(crop[None, ..., None]).numpy()[0]

    def roi_labels(self, probabilities, crop_grid, roi, grid):
        """The labels (z, y, x) on the ROI of the (canonical) image ``grid``: the argmax of the
        SCN's ``probabilities`` on ``crop_grid`` resampled onto the ROI, then, with a
        ``min_island_fraction``, an organ's small pieces dropped (not at the image's edge)."""
        labels = labels_on_roi(probabilities, crop_grid, roi.grid(grid), plain=self.plain)
        # the ROI's faces that are the image's own: pieces there may be cut off by the scan
        edges = tuple((roi.start[axis] == 0, roi.stop[axis] == grid.size[axis])
                      for axis in (2, 1, 0))
        drop_islands(labels, self.min_island_fraction, edges)
        return labels

    def predict(self, image):
        """Segment a CT (HU) image; returns a ``CaseResult`` whose uint8 labels lie on its grid."""
        seconds = {}
        clock = time.perf_counter()

        def lap(stage):
            nonlocal clock
            now = time.perf_counter()
            seconds[stage] = round(now - clock, 3)
            clock = now

        canonical, orientation = to_canonical(image)
        grid = Grid.of(canonical)
        lap("orientation")

        loc_grid = localization_grid(grid)
        loc_input = self.localization_input(canonical, loc_grid)
        lap("localization_preprocessing")
        self._ready["localization"].wait()  # the loading thread; 0 s once it is done
        lap("localization_warm_up")
        roi = self.roi(loc_input, loc_grid, grid)
        lap("localization_network")

        crop_grid, crop = self.segmentation_input(canonical, roi)
        lap("segmentation_preprocessing")
        segment = self._network("segmentation")
        lap("segmentation_warm_up")
        probabilities = segment(crop[None, ..., None]).numpy()[0]
        lap("segmentation_network")

        roi_labels = self.roi_labels(probabilities, crop_grid, roi, grid)
        labels = sitk.GetImageFromArray(paste(roi_labels, roi, grid.size))
        labels.CopyInformation(canonical)
        labels = from_canonical(labels, orientation, image)
        lap("resampling_back")

        low_mm, high_mm = roi.axis_mm(grid)
        return CaseResult(
            labels=labels,
            roi_index={"start_xyz": list(roi.start), "size_xyz": list(roi.size),
                       "orientation": "canonical LPS voxel axes"},
            roi_mm={"low_xyz": np.round(low_mm, 2).tolist(),
                    "high_xyz": np.round(high_mm, 2).tolist(),
                    "extent_xyz": np.round(high_mm - low_mm, 2).tolist()},
            localization_spacing_mm=round(loc_grid.spacing_mm[0], 4),
            segmentation_spacing_mm=round(crop_grid.spacing_mm[0], 4),
            crop_size=crop_grid.size,
            seconds=seconds,
        )
