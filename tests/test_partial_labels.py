"""Partly labelled cases: declarations, marginal training losses, and the train step."""

import json

import numpy as np
import pytest
import tensorflow as tf

from training import losses
from training.coverage import (ALL_ORGANS, DeclarationError, coverage_vector, covered_organs,
                               folder_declarations, read_dataset_json, read_labelled_json)

SHAPE = (1, 8, 8, 8)
LIVER_AND_KIDNEY = (1, 2)  # the tests' partial case: spleen (3) and pancreas (4) not drawn


def truth_labels(seed=0):
    """(1, 8, 8, 8) labels holding every organ, each a block, on background."""
    labels = np.zeros(SHAPE, np.int32)
    labels[0, 1:4, 1:4, 1:4] = 1
    labels[0, 1:4, 5:7, 1:4] = 2
    labels[0, 5:7, 1:4, 1:4] = 3
    labels[0, 5:7, 5:7, 5:7] = 4
    return labels


def partial(labels, covered):
    """The label a partial annotator draws: uncovered organs left as background."""
    return np.where(np.isin(labels, covered), labels, 0)


def one_hot(labels, classes=5):
    return tf.one_hot(labels, classes)


def random_outputs(seed=0):
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(5), size=SHAPE).astype(np.float32)
    return {"probabilities": tf.Variable(probabilities),
            "local_logits": tf.Variable(rng.normal(size=(*SHAPE, 5)).astype(np.float32)),
            "spatial_logits": tf.Variable(rng.normal(size=(*SHAPE, 5)).astype(np.float32))}


def method_scn_loss(outputs, target, epsilon=1e-4):
    """The SCN loss as defined before partial labels (METHOD.md: generalized Dice on P with
    weights 1 / (sum label^2 + eps), 0 for absent classes, + sigmoid cross-entropy on L and S)."""
    p, t = tf.cast(outputs["probabilities"], tf.float32), tf.cast(target, tf.float32)
    axes = [0, 1, 2, 3]
    squared = tf.reduce_sum(t**2, axis=axes)
    weights = tf.where(squared > 0, 1.0 / (squared + epsilon), 0.0)
    dice = 1.0 - 2.0 * tf.reduce_sum(weights * tf.reduce_sum(p * t, axis=axes)) / (
        tf.reduce_sum(weights * tf.reduce_sum(p**2 + t**2, axis=axes)) + epsilon)
    local, spatial = (tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=t, logits=tf.cast(outputs[key], tf.float32)))
        for key in ("local_logits", "spatial_logits"))
    return dice + local + spatial


# --- Declarations ---------------------------------------------------------------------------------

def test_labelled_json_declares_cases_and_the_whole_folder(tmp_path):
    path = tmp_path / "labelled.json"
    path.write_text(json.dumps({"chaos_ct3": ["liver"], "b": ["Kidneys", "spleen"],
                                "*": ["pancreas", 1]}))
    declared = read_labelled_json(path)
    assert covered_organs(declared, "chaos_ct3") == (1,)
    assert covered_organs(declared, "b") == (2, 3)
    assert covered_organs(declared, "other") == (1, 4)
    path.write_text(json.dumps(["liver", "kidney"]))
    assert covered_organs(read_labelled_json(path), "any") == (1, 2)
    assert covered_organs({}, "undeclared") == ALL_ORGANS


def test_the_shared_partial_case_declares_its_liver_only():
    from release.roi_coverage import SHARED_DATA

    folder = SHARED_DATA / "partial"
    if not (folder / "labelled.json").is_file():
        pytest.skip(f"{folder}/labelled.json is absent (../shared/data not on this machine)")
    assert covered_organs(folder_declarations(folder), "chaos_ct3") == (1,)


def test_dataset_json_declares_per_entry_and_per_folder(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({
        "labels": {"background": 0, "liver": 1},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz",
                      "labelled": ["liver"]},
                     {"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}],
        "labelled": {"c": ["spleen"]}}))
    declared = read_dataset_json(path)
    assert covered_organs(declared, "a") == (1,)
    assert covered_organs(declared, "b") == ALL_ORGANS
    assert covered_organs(declared, "c") == (3,)
    path.write_text(json.dumps({"name": "plain nnU-Net", "training": []}))
    assert read_dataset_json(path) == {}


@pytest.mark.parametrize("text, message", [
    ('{"a": ["liver", "lung"]}', "unknown organ \"lung\""),
    ('{"a": ["liver",', "not valid JSON"),
    ('{"a": "liver"}', "non-empty list"),
    ('{"a": []}', "non-empty list"),
    ('"liver"', "expected an object"),
    ('{"a": [7]}', "unknown organ 7"),
])
def test_a_bad_labelled_json_is_an_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "labelled.json"
    path.write_text(text)
    with pytest.raises(DeclarationError, match=message) as error:
        folder_declarations(tmp_path)
    assert str(path) in str(error.value)


def test_a_bad_dataset_json_entry_is_an_error_naming_the_file_and_case(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"training": [{"label": "./labelsTr/x.nii.gz",
                                              "labelled": ["livr"]}]}))
    with pytest.raises(DeclarationError, match=r"training entry 0 \(x\).*unknown organ") as error:
        folder_declarations(tmp_path)
    assert str(path) in str(error.value)


def test_two_files_declaring_a_case_differently_is_an_error(tmp_path):
    (tmp_path / "labelled.json").write_text('{"x": ["liver"]}')
    (tmp_path / "dataset.json").write_text('{"labelled": {"x": ["spleen"]}}')
    with pytest.raises(DeclarationError, match="differently"):
        folder_declarations(tmp_path)


def test_find_cases_coverage_and_the_cache_keep_the_declaration(tmp_path, monkeypatch):
    import SimpleITK as sitk

    from training import store
    from training.cases import case_coverage, prepare_case

    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[3:8, 3:8, 3:8] = 1
    image = sitk.GetImageFromArray(np.full((12, 12, 12), 40, np.int16))
    image.SetSpacing((3.0, 3.0, 3.0))
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    for name in ("full", "liver_only"):
        sitk.WriteImage(image, str(folder / "images" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(label_image, str(folder / "labels" / f"{name}.nii.gz"))
    (folder / "labelled.json").write_text('{"liver_only": ["liver"]}')
    assert case_coverage(folder) == {"full": ALL_ORGANS, "liver_only": (1,)}

    case = prepare_case("liver_only", image, label_image, (1,))
    store.save(case, tmp_path / "cache" / "liver_only")
    assert store.load(tmp_path / "cache" / "liver_only").covered == (1,)
    # an entry written before coverage existed: every organ
    meta_path = tmp_path / "cache" / "liver_only" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["covered"]
    meta_path.write_text(json.dumps(meta))
    assert store.load(tmp_path / "cache" / "liver_only").covered == ALL_ORGANS


# --- Losses ---------------------------------------------------------------------------------------

def test_all_organs_covered_gives_exactly_the_method_loss():
    labels = truth_labels()
    outputs, target = random_outputs(), one_hot(labels)
    everything = coverage_vector(ALL_ORGANS)[None]
    reference = float(method_scn_loss(outputs, target))
    assert float(losses.scn_loss(outputs, target)) == reference
    assert float(losses.scn_loss(outputs, target, everything)) == reference
    logits = tf.constant(np.random.default_rng(1).normal(size=(*SHAPE, 2)), tf.float32)
    foreground = one_hot(labels > 0, 2)
    assert float(losses.localization_loss(logits, foreground, everything)) == float(
        losses.localization_loss(logits, foreground))


def scn_gradients(labels, coverage):
    outputs = random_outputs()
    with tf.GradientTape() as tape:
        loss = losses.scn_loss(outputs, one_hot(labels), coverage)
    return {key: gradient.numpy()[0] for key, gradient in zip(
        outputs, tape.gradient(loss, list(outputs.values())))}


def test_scn_loss_gives_uncovered_organ_voxels_no_push_to_background_or_covered_organs():
    truth = truth_labels()
    coverage = coverage_vector(LIVER_AND_KIDNEY)[None]
    gradients = scn_gradients(partial(truth, LIVER_AND_KIDNEY), coverage)
    hidden = np.isin(truth[0], (3, 4))  # spleen and pancreas voxels, background in the label
    # sigmoid outputs: background and uncovered channels are undecided there, so no gradient;
    # covered organs are known absent (a positive gradient lowers their logits)
    for key in ("local_logits", "spatial_logits"):
        g = gradients[key][hidden]
        assert np.all(g[:, [0, 3, 4]] == 0.0)
        assert np.all(g[:, [1, 2]] > 0.0)
    # combined P: the loss sees background + spleen + pancreas only as their sum
    g = gradients["probabilities"][hidden]
    np.testing.assert_array_equal(g[:, 0], g[:, 3])
    np.testing.assert_array_equal(g[:, 0], g[:, 4])
    assert np.all(g[:, [1, 2]] >= g[:, [0]])
    # inside a covered organ, an uncovered organ is known absent, as background is
    liver = gradients["local_logits"][truth[0] == 1]
    assert np.all(liver[:, [0, 2, 3, 4]] > 0.0) and np.all(liver[:, 1] < 0.0)


def test_without_coverage_the_same_label_pushes_those_voxels_to_background():
    """The control: today's loss on the partial label wrongly teaches background there."""
    truth = truth_labels()
    gradients = scn_gradients(partial(truth, LIVER_AND_KIDNEY), None)
    hidden = np.isin(truth[0], (3, 4))
    assert np.all(gradients["local_logits"][hidden][:, 0] < 0.0)
    assert np.all(gradients["local_logits"][hidden][:, 3] > 0.0)


def test_localization_loss_leaves_label_background_unknown_when_an_organ_is_uncovered():
    truth = truth_labels()
    labels = partial(truth, (1,)) > 0
    logits = tf.Variable(np.random.default_rng(2).normal(size=(*SHAPE, 2)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = losses.localization_loss(logits, one_hot(labels, 2), coverage_vector((1,))[None])
    gradient = tape.gradient(loss, logits).numpy()[0]
    assert np.all(gradient[~labels[0]] == 0.0)  # spleen, kidney, pancreas and background alike
    liver = gradient[labels[0]]
    assert np.all(liver[:, 1] < 0.0) and np.all(liver[:, 0] > 0.0)  # labelled organ: foreground


def test_coverage_is_per_sample_in_a_batch():
    truth = np.concatenate([truth_labels(), truth_labels()])
    labels = np.stack([truth[0], partial(truth[1:], (1,))[0]])
    coverage = np.stack([coverage_vector(ALL_ORGANS), coverage_vector((1,))])
    logits = tf.Variable(np.zeros((2, *SHAPE[1:], 5), np.float32))
    with tf.GradientTape() as tape:
        loss = losses.sigmoid_cross_entropy(logits, one_hot(labels), coverage)
    gradient = tape.gradient(loss, logits).numpy()
    spleen = truth[0] == 3
    assert np.all(gradient[0][spleen][:, 0] > 0) and np.all(gradient[0][spleen][:, 3] < 0)
    assert np.all(gradient[1][spleen][:, [0, 3]] == 0)


# --- The compiled training step -------------------------------------------------------------------

def free_voxel_model(channels_by_output, seed=0):
    """A model whose outputs are free per-voxel variables (ignoring the image but for its
    shape), so a training step's change of each output is the step's gradient for it; each
    variable carries a zero L2 penalty (the step adds the model's regularization losses)."""
    import keras

    class FreeVoxels(keras.layers.Layer):
        def __init__(self, channels, **kwargs):
            super().__init__(**kwargs)
            self.channels = channels

        def build(self, input_shape):
            self.values = self.add_weight(
                shape=(*SHAPE[1:], self.channels),
                initializer=keras.initializers.RandomUniform(0.05, 0.95, seed=seed),
                regularizer=keras.regularizers.L2(0.0))

        def call(self, image):
            return self.values[None] + 0.0 * image

    image = keras.Input((*SHAPE[1:], 1))
    outputs = {name: FreeVoxels(channels, name=name)(image)
               for name, channels in channels_by_output.items()}
    if list(outputs) == ["logits"]:
        outputs = outputs["logits"]
    return keras.Model(image, outputs)


ULPS = 4 * float(np.spacing(np.float32(1.0)))


def one_step(segmentation, labels, coverage):
    """Each output's change after one compiled SGD step from the same start."""
    import keras

    from training.train import make_train_step

    model = free_voxel_model({"probabilities": 5, "local_logits": 5, "spatial_logits": 5}
                             if segmentation else {"logits": 2})
    optimizer = keras.optimizers.SGD(100.0)  # changes far above the rounding of weights
    optimizer.build(model.trainable_variables)
    ema = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
    step = make_train_step(model, optimizer, ema, tf.Variable(0, dtype=tf.int64),
                           tf.Variable(0.0), segmentation, 0.999)
    before = [v.numpy() for v in model.trainable_variables]
    image = np.zeros((*SHAPE, 1), np.float32)
    args = (image, labels.astype(np.uint8)) + (() if coverage is None else (coverage,))
    loss, _ = step(*args)
    names = [v.path.split("/")[0] for v in model.trainable_variables]
    return float(loss), {name: v.numpy() - b for name, v, b in zip(
        names, model.trainable_variables, before)}


def test_compiled_scn_step_moves_nothing_toward_background_at_uncovered_organs():
    truth = truth_labels()
    coverage = coverage_vector(LIVER_AND_KIDNEY)[None]
    _, change = one_step(True, partial(truth, LIVER_AND_KIDNEY), coverage)
    hidden = np.isin(truth[0], (3, 4))
    for name in ("local_logits", "spatial_logits"):
        assert np.all(change[name][hidden][:, [0, 3, 4]] == 0.0)
        assert np.all(change[name][hidden][:, [1, 2]] < 0.0)
    # equal up to the rounding of weight - change (values in [0, 1], a few float32 ulps)
    p = change["probabilities"][hidden]
    assert np.abs(p[:, 0]).min() > 100 * ULPS
    np.testing.assert_allclose(p[:, 0], p[:, 3], rtol=0, atol=ULPS)
    np.testing.assert_allclose(p[:, 0], p[:, 4], rtol=0, atol=ULPS)
    assert np.all(p[:, [1, 2]] < p[:, [0]])


def test_compiled_localization_step_leaves_unknown_voxels_alone():
    truth = truth_labels()
    labels = (partial(truth, (1,)) > 0).astype(np.uint8)
    _, change = one_step(False, labels, coverage_vector((1,))[None])
    delta = change["logits"]
    assert np.all(delta[~labels[0].astype(bool)] == 0.0)
    assert np.all(delta[labels[0].astype(bool)][:, 1] > 0.0)


@pytest.mark.parametrize("segmentation", [True, False])
def test_compiled_step_with_every_organ_declared_trains_exactly_as_without(segmentation):
    labels = truth_labels() if segmentation else (truth_labels() > 0)
    loss, change = one_step(segmentation, labels, None)
    declared_loss, declared_change = one_step(segmentation, labels,
                                              coverage_vector(ALL_ORGANS)[None])
    assert declared_loss == loss
    for name in change:
        np.testing.assert_array_equal(declared_change[name], change[name])


def test_the_sample_pipeline_carries_each_sample_coverage():
    from training.train import sample_dataset

    def make_sample(rng):
        covered = ALL_ORGANS if rng.uniform() < 0.5 else (1,)
        return (rng.uniform(size=(4, 4, 4)), np.ones((4, 4, 4), np.uint8),
                coverage_vector(covered))

    dataset = sample_dataset(make_sample, seed=5, workers=2, depth=2, with_coverage=True)
    for index, (image, _, coverage) in enumerate(dataset.take(4)):
        expected = make_sample(np.random.default_rng([5, index]))[2]
        assert image.shape == (1, 4, 4, 4, 1) and coverage.shape == (1, 5)
        np.testing.assert_array_equal(coverage.numpy()[0], expected)


# --- Evaluation -----------------------------------------------------------------------------------

def write_label_map(path, array):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.5, 1.5, 2.0))
    image.SetOrigin((-10.0, 5.0, 30.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def partly_labelled_folder(tmp_path):
    """data/labels: "full" labels every organ, "liver_only" its liver alone (its other organs,
    background in the label, are in the image); pred/: both predicted perfectly, every organ."""
    truth = np.zeros((16, 20, 24), np.uint8)
    truth[2:8, 2:10, 2:10] = 1
    truth[2:8, 12:16, 2:8] = 2
    truth[9:14, 2:8, 12:20] = 3
    truth[10:14, 12:18, 14:22] = 4
    labels, predictions = tmp_path / "data" / "labels", tmp_path / "pred"
    labels.mkdir(parents=True)
    predictions.mkdir()
    write_label_map(labels / "full.nii.gz", truth)
    write_label_map(labels / "liver_only.nii.gz", np.where(truth == 1, 1, 0))
    for case in ("full", "liver_only"):
        write_label_map(predictions / f"{case}.nii.gz", truth)
    return tmp_path


def test_evaluation_scores_only_the_organs_a_declared_label_covers(partly_labelled_folder):
    from evaluation.evaluate import evaluate_folder

    root = partly_labelled_folder
    (root / "data" / "labelled.json").write_text('{"liver_only": ["liver"]}')
    evaluation = evaluate_folder(root / "pred", root / "data" / "labels", workers=1,
                                 progress=False)
    assert evaluation.labelled == root / "data" / "labelled.json"
    assert [row["organ"] for row in evaluation.rows if row["case"] == "liver_only"] == ["liver"]
    organs = evaluation.summary["organs"]
    assert organs["liver"]["cases"] == 2 and organs["spleen"]["cases"] == 1
    assert all(organs[name]["dsc"]["mean"] == 1.0 for name in organs)
    assert evaluation.partial_cases == {"liver_only": ["liver"]}
    markdown = evaluation.outputs["markdown"].read_text(encoding="utf-8")
    assert "Partly labelled" in markdown and "liver_only (liver)" in markdown
    summary = json.loads(evaluation.outputs["json"].read_text())
    assert summary["partial_cases"] == {"liver_only": ["liver"]}
    assert summary["organs"]["pancreas"]["cases"] == 1


def test_without_a_declaration_evaluation_keeps_the_flare_rule(partly_labelled_folder):
    from evaluation.evaluate import evaluate_folder

    root = partly_labelled_folder
    evaluation = evaluate_folder(root / "pred", root / "data" / "labels", workers=1,
                                 progress=False)
    assert evaluation.labelled is None and evaluation.partial_cases == {}
    spleen = [row for row in evaluation.rows if row["organ"] == "spleen"]
    assert [(row["case"], row["dsc"], row["nsd"]) for row in spleen] == [
        ("full", 1.0, 1.0), ("liver_only", 0.0, 0.0)]  # predicted but not in the label
    assert evaluation.summary["organs"]["spleen"]["cases"] == 2
    assert evaluation.summary["organs"]["spleen"]["dsc"]["mean"] == 0.5


def test_evaluate_cli_reads_labelled_file_and_names_a_bad_one(partly_labelled_folder, capsys):
    from evaluation.evaluate import main

    root = partly_labelled_folder
    declaration = root / "dataset.json"  # not beside the labels: found only when given
    declaration.write_text(json.dumps({"training": [
        {"image": "./imagesTr/liver_only_0000.nii.gz", "label": "./labelsTr/liver_only.nii.gz",
         "labelled": ["liver"]}]}))
    out = root / "scores.csv"
    assert main(["--pred", str(root / "pred"), "--labels", str(root / "data" / "labels"),
                 "--out", str(out), "--labelled", str(declaration), "--quiet"]) == 0
    assert "liver_only (liver)" in capsys.readouterr().out
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["labelled"] == str(declaration)
    assert summary["organs"]["kidney"]["cases"] == 1

    bad = root / "labelled.json"
    bad.write_text('{"liver_only": ["liver", "gallbladder"]}')
    assert main(["--pred", str(root / "pred"), "--labels", str(root / "data" / "labels"),
                 "--out", str(out), "--labelled", str(bad), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and "gallbladder" in error
