"""Tests of synthetic.anatomy: CT rendered around real anatomy (label maps).

Most tests draw their label maps from procedural cases on 4 mm grids (fast, and every organ where
the generator puts it); the last ones read real maps from ../shared/anatomy.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from synthetic import anatomy, generate_case
from synthetic.__main__ import DIRECTIONS, fixed_geometry
from synthetic.__main__ import main as cli_main
from synthetic.appearance import _PHASE_HU
from synthetic.generator import patient_of
from tests.conftest import ROOT, shared_or_skip

ANATOMY = ROOT.parent / "shared" / "anatomy"


def procedural_map(tmp_path, seed=21, keep=(1, 2, 3, 4), name="demo_0001", covers=None):
    """A label map file made from a procedural case, with a gallbladder-like and a stomach-like
    neighbour added (values 5 and 6) in free space beside the liver; ``keep`` the organs kept."""
    geometry = fixed_geometry((100, 90, 80), (4.0, 4.0, 4.0), DIRECTIONS["identity"])
    _, label = generate_case(seed, geometry)
    array = sitk.GetArrayFromImage(label)
    array[~np.isin(array, keep)] = 0
    # Each neighbour: a ball of 3 voxels in the free space nearest to the liver's centre.
    liver_centre = np.argwhere(array == 1).mean(axis=0)
    for value in (5, 6):
        room = ndimage.distance_transform_edt(array == 0)
        candidates = np.argwhere(room > 5)
        centre = candidates[np.argmin(((candidates - liver_centre) ** 2).sum(axis=1))]
        zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in array.shape)]
        array[(zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < 9] = value
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(label)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path))
    if covers is not None:
        (tmp_path / "anatomy.json").write_text(json.dumps(
            {"cases": {name: {"file": path.name, "covers": list(covers), "source": "demo",
                              "patient": name}}}))
    return path, array


def test_labels_equal_the_maps_organs_on_its_grid_and_neighbours_stay_unlabelled(tmp_path):
    path, array = procedural_map(tmp_path)
    assert {5, 6} <= set(np.unique(array))
    label_map = anatomy.read_label_map(path)
    image, label = anatomy.render_case(label_map, seed=3, geometry="map", augment=False)
    labels = sitk.GetArrayFromImage(label)
    reference = sitk.ReadImage(str(path))
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(label, attribute)() == getattr(reference, attribute)()
        assert getattr(image, attribute)() == getattr(reference, attribute)()
    expected = np.where(array <= 4, array, 0)
    np.testing.assert_array_equal(labels, expected)


def test_organs_the_map_does_not_cover_are_drawn_clear_of_the_covered_ones(tmp_path):
    # A liver-only map (as a partly labelled source): kidneys, spleen and pancreas are unknown.
    path, array = procedural_map(tmp_path, keep=(1,), covers=["liver", "gallbladder", "stomach"])
    label_map = anatomy.read_label_map(path)
    assert label_map.covers == {"liver", "gallbladder", "stomach"}
    info = {}
    _, label = anatomy.render_case(label_map, seed=5, geometry="map", augment=False, info=info)
    labels = sitk.GetArrayFromImage(label)
    assert info["real_organs"] == ["liver"]
    np.testing.assert_array_equal(labels == 1, array == 1)
    voxel_ml = 4.0 ** 3 / 1000.0
    for value, low_ml in ((2, 150), (3, 60), (4, 20)):
        assert (labels == value).sum() * voxel_ml > low_ml, f"organ {value} not drawn"
    drawn = np.isin(labels, (2, 3, 4))
    assert not (drawn & (array != 0)).any(), "a drawn organ overlaps a structure of the map"


def test_a_map_with_one_kidney_gets_the_other_side_drawn(tmp_path):
    path, array = procedural_map(tmp_path)
    kidneys = array == 2
    x = np.argwhere(kidneys)[:, 2]
    right = np.zeros_like(kidneys)
    right[..., : int(np.median(x))] = True  # identity grid: low x is the patient's right
    array[kidneys & right] = 0
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(path)))
    sitk.WriteImage(image, str(path))
    info = {}
    _, label = anatomy.render_case(anatomy.read_label_map(path), 8, geometry="map",
                                   augment=False, info=info)
    labels = sitk.GetArrayFromImage(label)
    assert info["drawn_organs"] == ["kidney_r"]
    assert (labels[array == 2] == 2).all()
    new = (labels == 2) & (array != 2)
    assert new.sum() * 0.064 > 80, "no right kidney drawn"
    assert np.argwhere(new)[:, 2].mean() < np.argwhere(array == 2)[:, 2].mean()
    assert not (new & (array != 0)).any()


def test_rendering_is_deterministic_per_seed(tmp_path):
    path, _ = procedural_map(tmp_path)
    label_map = anatomy.read_label_map(path)
    first = [sitk.GetArrayFromImage(i) for i in anatomy.render_case(label_map, 4,
                                                                     in_plane_size=64)]
    again = [sitk.GetArrayFromImage(i) for i in anatomy.render_case(label_map, 4,
                                                                     in_plane_size=64)]
    other = [sitk.GetArrayFromImage(i) for i in anatomy.render_case(label_map, 5,
                                                                     in_plane_size=64)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape != other[0].shape or not np.array_equal(first[0], other[0])


def test_augmentation_scales_and_deforms_without_mirroring(tmp_path):
    path, array = procedural_map(tmp_path)
    label_map = anatomy.read_label_map(path)
    voxel_ml = 0.064
    for seed in range(3):
        _, label = anatomy.render_case(label_map, seed, geometry="map", augment=True)
        labels = sitk.GetArrayFromImage(label)
        assert not np.array_equal(labels, np.where(array <= 4, array, 0))
        # Human ranges: each organ within 0.9^3 .. 1.1^3 of its volume (and a voxel's rounding).
        for value in (1, 3):
            ratio = (labels == value).sum() / (array == value).sum()
            assert 0.65 < ratio < 1.45, (seed, value, ratio)
        # Liver on the right (low x on this identity grid), spleen on the left.
        assert np.argwhere(labels == 1)[:, 2].mean() < np.argwhere(labels == 3)[:, 2].mean()
        assert (labels == 4).sum() * voxel_ml > 10


def test_organ_centre_is_the_covered_organs_mean_position_in_mm(tmp_path):
    path, array = procedural_map(tmp_path)
    label_map = anatomy.read_label_map(path)
    label_map.image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    label_map.image.SetOrigin((10.0, -20.0, 30.0))
    voxels = np.argwhere(np.isin(array, (1, 2, 3, 4)))
    expected = label_map.image.TransformContinuousIndexToPhysicalPoint(
        voxels.mean(axis=0)[::-1].tolist())
    np.testing.assert_allclose(label_map.organ_centre(step=(1, 1, 1)), expected, atol=1e-6)
    # the default samples every few voxels: within a voxel or two (4 mm here) of the exact mean
    np.testing.assert_allclose(label_map.organ_centre(), expected, atol=6.0)
    neighbours_only = sitk.GetImageFromArray(np.where(array >= 5, array, 0).astype(np.uint8))
    neighbours_only.CopyInformation(sitk.ReadImage(str(path)))
    empty = tmp_path / "empty_0001.nii.gz"
    sitk.WriteImage(neighbours_only, str(empty))
    with pytest.raises(ValueError, match="empty_0001.nii.gz: holds none of the organs"):
        anatomy.read_label_map(empty).organ_centre()


@pytest.mark.parametrize("phase", sorted(_PHASE_HU))
def test_organ_hu_follows_the_contrast_phase(tmp_path, phase):
    seed = next(s for s in range(200) if patient_of(s).phase == phase)
    path, _ = procedural_map(tmp_path)
    image, label = anatomy.render_case(anatomy.read_label_map(path), seed, geometry="map",
                                       augment=False)
    hu, labels = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    patient = patient_of(seed)
    # Interior voxels (no partial volume); medians are robust to lesions and noise.
    for value, tissue in ((1, "liver"), (3, "spleen")):
        inside = ndimage.binary_erosion(labels == value, iterations=2)
        low, high = _PHASE_HU[phase][tissue]
        if tissue == "liver" and patient.hu["liver"] < low:  # a fatty liver is darker
            low -= 60
        assert low - 25 < np.median(hu[inside]) < high + 25, (phase, tissue)
    kidney = ndimage.binary_erosion(labels == 2, iterations=1)
    low = min(_PHASE_HU[phase]["medulla"][0], _PHASE_HU[phase]["cortex"][0])
    high = max(_PHASE_HU[phase]["cortex"][1], _PHASE_HU[phase]["pelvis"][1])
    assert low - 60 < np.median(hu[kidney]) < high + 25, phase


def test_reader_refuses_unknown_values_and_non_integer_maps(tmp_path):
    array = np.zeros((8, 8, 8), np.uint8)
    array[2:4, 2:4, 2:4] = 42
    bad = tmp_path / "bad_values.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(bad))
    with pytest.raises(ValueError, match=r"bad_values\.nii\.gz.*\[42\]"):
        anatomy.read_label_map(bad)
    floats = tmp_path / "floats.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.float32)), str(floats))
    with pytest.raises(ValueError, match=r"floats\.nii\.gz.*integers"):
        anatomy.read_label_map(floats)
    with pytest.raises(FileNotFoundError, match="missing"):
        anatomy.read_label_map(tmp_path / "missing.nii.gz")


def test_held_out_maps_are_chosen_by_patient_and_stay_put(tmp_path):
    cases = {}
    for i in range(40):
        patient = f"p{i // 2}"  # two maps per patient
        cases[f"src_{i:03d}"] = {"file": f"src_{i:03d}.nii.gz", "source": "src",
                                 "patient": patient, "covers": ["liver"]}
    (tmp_path / "anatomy.json").write_text(json.dumps({"cases": cases}))
    paths = [tmp_path / f"src_{i:03d}.nii.gz" for i in range(40)]
    held = anatomy.held_out(paths)
    assert len(held) == 6  # 15 % of 20 patients, both maps of each
    patients = {cases[name]["patient"] for name in held}
    assert len(patients) == 3
    assert anatomy.held_out(list(reversed(paths))) == held


def test_cli_renders_cases_around_a_map(tmp_path, capsys):
    path, _ = procedural_map(tmp_path / "maps")
    out = tmp_path / "out"
    assert cli_main(["--anatomy", str(path.parent), "--out", str(out), "--cases", "2",
                     "--seed", "7", "--in-plane-size", "48"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["case_0000.nii.gz", "case_0000_0000.nii.gz", "case_0001.nii.gz",
                       "case_0001_0000.nii.gz"]
    assert "map demo_0001" in capsys.readouterr().out
    assert cli_main(["--anatomy", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_training_renders_maps_in_turn_from_the_first_case_it_is_given(tmp_path):
    from training.train import parse_args, prepare_cases

    folder = tmp_path / "maps"
    procedural_map(folder, seed=21, name="demo_0001")
    procedural_map(folder, seed=22, name="demo_0002")

    def rendered(first, cache):
        args = parse_args(["--stage", "segmentation", "--run", str(tmp_path / "run"),
                           "--cache", str(tmp_path / cache), "--anatomy", str(folder),
                           "--anatomy-cases", "3", "--anatomy-first-case", str(first),
                           "--generated", "0", "--validation", "0", "--generated-size", "48",
                           "--workers", "1"])
        return {case.name: sitk.GetArrayFromImage(case.segmentation_image)
                for case in prepare_cases(args)[3]}

    first, later = rendered(0, "cache_0"), rendered(2, "cache_2")  # separate caches
    assert list(first) == ["anatomy_train_0000_demo_0001", "anatomy_train_0001_demo_0002",
                           "anatomy_train_0002_demo_0001"]
    assert list(later) == ["anatomy_train_0002_demo_0001", "anatomy_train_0003_demo_0002",
                           "anatomy_train_0004_demo_0001"]
    # a case index is one seed whatever the first case; the same map at another index is a
    # new draw of appearance and deformation
    np.testing.assert_array_equal(first["anatomy_train_0002_demo_0001"],
                                  later["anatomy_train_0002_demo_0001"])
    zero, four = first["anatomy_train_0000_demo_0001"], later["anatomy_train_0004_demo_0001"]
    assert zero.shape != four.shape or not np.array_equal(zero, four)
    with pytest.raises(SystemExit):
        parse_args(["--stage", "segmentation", "--run", str(tmp_path / "run"),
                    "--anatomy-first-case", "-1"])


def test_benchmark_renders_the_asked_grid_and_reports_seconds(tmp_path, capsys):
    from benchmarks.rendering import main as benchmark_main

    path, _ = procedural_map(tmp_path / "maps")
    assert benchmark_main(["--anatomy", str(path.parent), "--maps", "1", "--size", "40", "36",
                           "24", "--spacing", "3", "3", "4", "--procedural", "1"]) == 0
    out = capsys.readouterr().out
    assert "demo_0001: " in out and "real anatomy, 40x36x24 voxels: " in out
    assert "procedural, 40x36x24 voxels: " in out and "peak resident memory" in out


def test_real_maps_render_with_their_organs_in_place():
    folder = shared_or_skip(ANATOMY, "the real label maps")
    catalogue = json.loads((folder / "anatomy.json").read_text())["cases"]
    for name in ("flare22_0003", "gibson_07"):
        label_map = anatomy.read_label_map(folder / catalogue[name]["file"])
        info = {}
        image, label = anatomy.render_case(label_map, 11, in_plane_size=128, info=info)
        labels = sitk.GetArrayFromImage(label)
        geometry = anatomy.CaseGeometry.from_image(label)
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4}, name

        def centroid(value, labels=labels, geometry=geometry):
            return geometry.index_to_physical(np.argwhere(labels == value)[:, ::-1]).mean(axis=0)

        # LPS: the liver on the patient's right (lower x) of the spleen.
        assert centroid(1)[0] < centroid(3)[0] - 50, name
        hu = sitk.GetArrayFromImage(image)
        assert hu.min() >= -1024 and np.median(hu[labels == 1]) > -10, name
        if name == "gibson_07":  # its right kidney is not in the map: drawn
            assert info["drawn_organs"] == ["kidney_r"]


def test_real_map_on_its_own_grid_keeps_every_organ_voxel():
    folder = shared_or_skip(ANATOMY, "the real label maps")
    label_map = anatomy.read_label_map(folder / "labels" / "flare22_0003.nii.gz")
    _, label = anatomy.render_case(label_map, 2, geometry="map", augment=False)
    labels = sitk.GetArrayFromImage(label)
    source = label_map.array()
    np.testing.assert_array_equal(labels, np.where(source <= 4, source, 0))


def test_roi_coverage_checks_held_out_real_anatomy(predictor):
    from release.roi_coverage import anatomy_cases, roi_coverage
    from training.train import anatomy_split

    folder = shared_or_skip(ANATOMY, "the real label maps")
    name, image, labels = next(anatomy_cases(folder, 128))
    assert name == "anatomy_" + anatomy_split(folder)[1][0].name.split(".")[0]
    record = roi_coverage(predictor, image, labels)
    assert record["organ_voxels"] > 0 and record["coverage"] > 0.9, record


def test_clearing_shift_is_the_shortest_that_clears_else_the_least_blocked():
    inside = np.zeros((5, 5, 5), bool)
    inside[1:4, 1:4, 1:4] = True  # a 3-voxel cube placed at (10, 10, 10) in a 25^3 block
    blocked = np.zeros((25, 25, 25), bool)
    blocked[:, :, :12] = True  # the cube's lower x half and more is blocked
    spacing = (2.0, 2.0, 2.0)
    shift = anatomy._clearing_shift(inside, blocked, (10, 10, 10), spacing, (10, 10, 10))
    np.testing.assert_array_equal(shift, [0, 0, 1])  # one voxel toward +x clears it
    # Nothing clears within reach: the least blocked shift, the shorter one among equals.
    blocked[:, :, :15] = True
    shift = anatomy._clearing_shift(inside, blocked, (10, 10, 10), spacing, (3, 3, 3))
    np.testing.assert_array_equal(shift, [0, 0, 3])  # a third of the cube still blocked
    # A shift never leaves the block, however clear the outside might be.
    blocked[:] = True
    blocked[:, :, 24] = False
    shift = anatomy._clearing_shift(inside, blocked, (10, 10, 10), spacing, (12, 12, 12))
    assert shift[2] <= 24 - 13
    assert anatomy._clearing_shift(inside, np.zeros_like(blocked), (10, 10, 10), spacing,
                                   (3, 3, 3)).tolist() == [0, 0, 0]


def test_a_dragged_polyline_moves_most_at_its_start():
    points = np.array([[0.0, 0, 0], [10, 0, 0], [30, 0, 0], [40, 0, 0]])
    dragged = anatomy._drag(points, np.array([0.0, 8.0, 0.0]))
    np.testing.assert_allclose(dragged[:, 1], [8.0, 6.0, 2.0, 0.0])
    np.testing.assert_array_equal(dragged[:, [0, 2]], points[:, [0, 2]])


def test_a_drawn_kidney_is_moved_clear_of_a_real_liver_rather_than_cut(monkeypatch):
    """gibson_13 covers the left kidney only; with seed 2 the drawn right kidney lies partly in
    the real liver: moved, it keeps its size; carved in place, it loses about a third."""
    folder = shared_or_skip(ANATOMY, "the real label maps")
    label_map = anatomy.read_label_map(folder / "labels" / "gibson_13.nii.gz")

    def right_kidney_ml():
        info = {}
        _, label = anatomy.render_case(label_map, 2, in_plane_size=128, info=info)
        labels = sitk.GetArrayFromImage(label)
        geometry = anatomy.CaseGeometry.from_image(label)
        x = {value: geometry.index_to_physical(np.argwhere(labels == value)[:, ::-1])[:, 0]
             for value in (1, 2, 3)}
        midline = 0.5 * (x[1].mean() + x[3].mean())  # between liver and spleen (LPS)
        voxel_ml = np.prod(label.GetSpacing()) / 1000.0
        return (x[2] < midline).sum() * voxel_ml, info

    moved_ml, info = right_kidney_ml()
    assert info["drawn_organs"] == ["kidney_r"] and "kidney_r" in info["moved_kidneys_mm"]
    assert 0 < np.linalg.norm(info["moved_kidneys_mm"]["kidney_r"]) <= anatomy.MOVE_MAX_MM
    monkeypatch.setattr(anatomy, "MOVE_MAX_MM", 0.0)
    carved_ml, info = right_kidney_ml()
    assert info["moved_kidneys_mm"] == {}
    assert moved_ml > 1.2 * carved_ml, (moved_ml, carved_ml)
