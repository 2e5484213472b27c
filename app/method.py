"""The numbers of the method, in one place.

Every constant comes from ../shared/METHOD.md (the EfficientSCN submission to FLARE 2021, Thaler
et al.); the comment on each names the section it comes from, and the few that are this
project's own say "ours". Sizes and spacings are given in SimpleITK / physical axis order
(x, y, z) unless the name says otherwise.
"""

# Labels: output label ids.
LABELS = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
NUM_CLASSES = 5  # background + 4 organs

# The two networks, in the order they run; weights files and graphs are named after them.
NETWORKS = ("localization", "segmentation")

# Intensity: HU / 2048, clipped to [-1, 1]; outside the image -1024 HU.
INTENSITY_DIVISOR_HU = 2048.0
PADDING_HU = -1024.0

# Stage 1 (localization).
LOCALIZATION_SPACING_MM = 6.0
LOCALIZATION_VALID_SIZES_XY = (32, 48, 64, 80)
LOCALIZATION_VALID_SIZES_Z = tuple(range(32, 257, 16))
LOCALIZATION_FIT_SLACK = 0.02  # added to the size ratio when the image must be shrunk
LOCALIZATION_TRAINING_SIGMA_MM = 3.0  # Gaussian before linear downsampling (training)
LOCALIZATION_DOWNSAMPLING = ("gaussian", "area")  # ours (training's), published inference's
ROI_MARGIN_MM = 10.0
# Ours: after the argmax, an organ's pieces under this fraction of its largest become background
# unless they touch the image's edge (0: none, the paper's plain argmax; weights/MODEL_CARD.md,
# rules R-islands and R-islands2)
MIN_ISLAND_FRACTION = 0.1
SUSPICIOUS_SPACING_MM = (1.0, 1.0, 1.0)
ASSUMED_SPACING_MM = (0.8145, 0.8145, 2.528)  # what the published code assumed then

# Stage 2 (segmentation).
SEGMENTATION_SPACING_MM = 2.0
SEGMENTATION_VALID_SIZES_X = (32, 64, 96, 128, 160)
SEGMENTATION_VALID_SIZES_Y = (32, 64, 96, 128)
SEGMENTATION_VALID_SIZES_Z = (32, 64, 96, 128, 160)
SEGMENTATION_ENLARGE_THRESHOLD_MM = 1.9  # above it the spacing becomes s + 0.1
SEGMENTATION_ENLARGE_STEP_MM = 0.1
SEGMENTATION_SMOOTHING_SIGMA_MM = 1.0
TRAINING_ROI_MARGIN_MM = 32.0  # Training: ground-truth box + 32 mm
PUBLISHED_CROP_PADDING_HU = 0.0  # crop padding of the published inference (stage 2)

# Ours, not METHOD.md's: partial fields of view. Shorter than this along an axis, an image shows
# part of the abdomen only (in adults the liver alone spans 150-200 mm cranio-caudally, liver dome
# to lower kidney poles 250-300 mm); both stages then keep the image's whole extent along it.
PARTIAL_FOV_EXTENT_MM = 200.0

# Networks.
DROPOUT_RATE = 0.1
LEAKY_RELU_ALPHA = 0.1
WEIGHT_DECAY = 1e-6
LOCALIZATION_LEVELS, LOCALIZATION_FILTERS = 5, 32
LOCAL_APPEARANCE_LEVELS, LOCAL_APPEARANCE_FILTERS = 5, 32
SPATIAL_LEVELS, SPATIAL_FILTERS = 4, 16
SPATIAL_DOWNSAMPLING = 4
LOCALIZATION_PARAMETERS = 637_474
SCN_PARAMETERS = 1_270_090
