"""release.install_candidate: the candidate a rule chose becomes the shipped weights, and
weights.json gains its run, export, validation and scores from the run's and OUT's files."""

import json
import shutil

import pytest

from release import record_round
from release.install_candidate import main
from tests.test_record_round import RULE, scored_round
from tests.test_pseudo_rule import BASE

N, RESUMED = 2400, 1000
VALIDATION = {2000: '"{""liver"": 0.91}"', 2400: '"{""liver"": 0.93}"'}
# a run folder copied from the previous run at its checkpoint 1,000 (its log holds that run's
# rows, clock 60-300 s), resumed to 2,600 in a second process whose clock restarts
LOG = (["iteration,loss,seconds,validation"]
       + [f"{i},0.5,{i * 0.3:.1f}," for i in range(200, RESUMED + 1, 200)]
       + [f"{i},0.4,{(i - RESUMED) * 0.5:.1f},{VALIDATION.get(i, '')}"
          for i in range(RESUMED + 200, 2601, 200)])
ARGS = {"generated": 20, "generated_size": 256, "data": ["data"], "data_weight": [0.1],
        "anatomy": "anatomy", "anatomy_cases": 118, "anatomy_weight": 0.55, "crop_size": [64] * 3,
        "learning_rate": 1e-4, "decay": [1500, 2600], "final_learning_rate": 1e-6,
        "pseudo_weight": 0.1, "ema_decay": 0.999, "precision": "float32", "seed": 17,
        "init_weights": "weights", "validation": 3}


def make_run(runs, args=ARGS):
    run = runs / "decay"
    run.mkdir(parents=True)
    (run / "log.csv").write_text("\n".join(LOG) + "\n")
    data = runs / "data"  # a fully labelled case and one whose labels cover the liver only
    for folder in ("images", "labels"):
        (data / folder).mkdir(parents=True)
    for case in ("full", "part"):
        (data / "images" / f"{case}_0000.nii.gz").write_bytes(b"")
        (data / "labels" / f"{case}.nii.gz").write_bytes(b"")
    (data / "labelled.json").write_text(json.dumps({"part": ["liver"]}))
    (run / "args.json").write_text(json.dumps({**args, "data": [str(data)],
                                               "pseudo": [str(runs / "pseudo2")]}))
    return run


def shipped(folder):
    folder.mkdir()
    (folder / "localization.weights.h5").write_bytes(b"localization")
    (folder / "segmentation.weights.h5").write_bytes(b"segmentation before")
    previous = {"run": "prev", "first_iteration": 0, "iterations": 5000,
                "training_wall_seconds": 4000.0, "anatomy_training_cases": 100}
    (folder / "weights.json").write_text(json.dumps({
        "date": "2026-01-01", "machines": {"cpu": "a 2-core CPU"},
        "localization": {"iterations": 7},
        "segmentation": {"iterations": 5000, "training_wall_seconds": 4000.0,
                         "warm_up_iterations": 100, "runs": [previous],
                         "real_anatomy": {"maps_used": {"btcv": 26, "word": 92}},
                         "pseudo_labels": {"rounds": [{"round": 1, "folder": "RUNS/pseudo2"}]},
                         "partial_labels": {"cases": {"part": ["liver"]}},
                         "export": {"run": "prev", "mean_of_iterations": [4000, 4500, 5000]}},
        "scores": {"old": 1}, "shipping_rules": [{**RULE, "run": "decay"}]}))
    return folder


def scored(tmp_path, run, record=True):
    out = scored_round(tmp_path / "out", a=BASE, run=str(run), n=N)  # A fails, B ships
    for name in "AB":
        (out / f"cand{name}" / "localization.weights.h5").write_bytes(b"localization")
        (out / f"cand{name}" / "segmentation.weights.h5").write_bytes(f"cand {name}".encode())
    if record:
        assert record_round.main([str(out), "--rule", "R-x", "--scored-on", "cpu", "--weights",
                                  str(tmp_path / "weights")]) == 0
    return out


def setup(tmp_path, args=ARGS, record=True):
    weights = shipped(tmp_path / "weights")
    run = make_run(tmp_path / "runs", args)
    return weights, run, scored(tmp_path, run, record)


def install(out, weights, run, *extra):
    return main([str(out), "--rule", "R-x", "--run", str(run), "--machine", "cpu", "--weights",
                 str(weights), "--from-checkpoint", str(RESUMED), *extra])


def test_the_chosen_candidate_is_installed_with_its_run_and_scores(tmp_path, capsys):
    weights, run, out = setup(tmp_path)
    assert install(out, weights, run) == 0
    assert (weights / "segmentation.weights.h5").read_bytes() == b"cand B"
    assert (weights / "localization.weights.h5").read_bytes() == b"localization"
    provenance = json.loads((weights / "weights.json").read_text())
    assert provenance["scores"] == json.loads((out / "scores_B.json").read_text())
    assert provenance["localization"] == {"iterations": 7}
    assert provenance["date"] != "2026-01-01"
    entry = provenance["segmentation"]
    link = entry["runs"][-1]
    # only what the run trained after the copied checkpoint, up to N: 1,400 iterations; its
    # clock: 0.5 s per iteration since the restart at 1,000 (the rows after N do not count)
    assert link["run"] == "decay" and link["first_iteration"] == 5000
    assert link["iterations"] == N - RESUMED and link["training_wall_seconds"] == 700.0
    assert link["started_from"] == "prev" and link["started_from_checkpoint"] == RESUMED
    assert link["shipped"] == {"rule": "R-x", "candidate": "B"} and link["machine"] == "cpu"
    assert link["learning_rate_decay"] == {"cosine_from_iteration": 1500, "to_iteration": 2600,
                                           "final_learning_rate": 1e-6}
    assert link["pseudo_label_folders"] == ["RUNS/pseudo2"] and link["pseudo_sample_share"] == 0.1
    assert entry["iterations"] == 5000 + N - RESUMED and entry["training_wall_seconds"] == 4700.0
    # B averaged snapshots 1,400, 1,900 and 2,400 of the run: in the chain, 5,400 to 6,400
    assert entry["export"] == {"weights": "ema", "run": "decay",
                               "mean_of_iterations": [5400, 5900, 6400]}
    assert entry["last_validation"] == {"iteration": N, "run": "decay", "validation_cases": 3,
                                        "liver": 0.93}
    assert entry["runs"][0]["run"] == "prev" and entry["pseudo_labels"]["rounds"]
    assert entry["real_anatomy"] == {"maps_used": {"btcv": 26, "word": 92}}
    assert "warm_up_iterations" not in entry  # the old run's, not the new one's
    assert entry["sample_seed"] == 17 and entry["machine"] == "cpu"
    assert not list(weights.glob("*.part")) and not list(weights.glob("*.previous"))
    assert "installed" in capsys.readouterr().out
    # a second install of the same round is refused and changes nothing
    assert install(out, weights, run) == 1
    assert "already the shipped weights" in capsys.readouterr().err
    assert json.loads((weights / "weights.json").read_text()) == provenance


def pseudo_labels_json(folder):
    """What training.pseudo_label writes, trimmed to one case."""
    folder.mkdir(parents=True)
    case = {"input": "../shared/data/unlabelled/images/scan_0000.nii.gz",
            "labels": "labels/scan.nii.gz", "size_xyz": [512, 512, 99],
            "volumes_ml": {"liver": 1549.19, "kidney": 427.83, "spleen": 363.94,
                           "pancreas": 78.59},
            "covered": ["liver", "kidney", "spleen", "pancreas"], "ignored_share": 0.0105,
            "ignored_share_of_organ_voxels": 0.1713, "seconds": 6.2}
    (folder / "pseudo_labels.json").write_text(json.dumps({
        "weights": {"folder": "/somewhere/weights", "sha256": {"segmentation.weights.h5": "ab"},
                    "date": "2026-12-07",
                    "segmentation": {"export": {"run": "prev"}, "iterations": 5000}},
        "second_weights": None, "precision": "bfloat16", "min_probability": 0.9,
        "min_island_fraction": 0.1,
        "covered": {"rule": "plausible adult volume"}, "cases": {"scan": case}, "failed": {}}))


def test_an_unrecorded_pseudo_label_folder_becomes_the_next_round(tmp_path):
    weights, run, out = setup(tmp_path)
    provenance = json.loads((weights / "weights.json").read_text())
    provenance["segmentation"]["pseudo_labels"]["rounds"][0]["folder"] = "RUNS/pseudo1"
    (weights / "weights.json").write_text(json.dumps(provenance))
    pseudo_labels_json(tmp_path / "runs" / "pseudo2")
    assert install(out, weights, run) == 0
    rounds = json.loads((weights / "weights.json").read_text())["segmentation"][
        "pseudo_labels"]["rounds"]
    assert [item["folder"] for item in rounds] == ["RUNS/pseudo1", "RUNS/pseudo2"]
    assert rounds[0] == {"round": 1, "folder": "RUNS/pseudo1"}
    new = rounds[1]
    assert new["round"] == 2 and new["cases"] == ["scan"] and new["sample_share"] == 0.1
    assert new["images"] == "../shared/data/unlabelled/images"
    assert new["weights_sha256"] == {"segmentation.weights.h5": "ab"}
    assert new["weights_export"] == {"segmentation": {"run": "prev"}}
    assert new["made_on"] == "2026-12-07" and new["min_probability"] == 0.9
    assert new["min_island_fraction"] == 0.1
    assert new["covered"] == {"rule": "plausible adult volume"}
    assert new["per_case"]["scan"]["volumes_ml"]["pancreas"] == 78.59
    assert set(new["per_case"]["scan"]) == {"volumes_ml", "covered", "ignored_share",
                                            "ignored_share_of_organ_voxels"}


def test_a_run_started_from_the_shipped_export_counts_from_zero(tmp_path):
    weights, run, out = setup(tmp_path)
    assert main([str(out), "--rule", "R-x", "--run", str(run), "--machine", "cpu",
                 "--weights", str(weights)]) == 0
    entry = json.loads((weights / "weights.json").read_text())["segmentation"]
    link = entry["runs"][-1]
    assert link["iterations"] == N and "started_from_checkpoint" not in link
    assert link["training_wall_seconds"] == 300.0 + 700.0
    assert entry["export"]["mean_of_iterations"] == [6400, 6900, 7400]


def unchanged(weights, before):
    return ({p.name: p.read_bytes() for p in weights.iterdir()} == before)


@pytest.mark.parametrize("breaks, message", [
    ("unrecorded", "has no round at N = 2400 (record it first"),
    ("nothing ships", "nothing ships in this round"),
    ("other network", "differs from the shipped localization network"),
    ("scratch", "started from scratch"),
    ("anatomy", "renders 100 anatomy maps, weights.json's real_anatomy counts 118"),
    ("pseudo", "pseudo2/pseudo_labels.json: missing, so the run's pseudo-label folder "
               "RUNS/pseudo2, not among weights.json's pseudo_labels rounds, cannot be recorded"),
    ("partial", "case part of DATA covers ['liver'], weights.json's partial_labels lists "
                "['kidney']: record it first"),
    ("no data", "its --data folder DATA is not here, so its partial labels cannot be checked"),
    ("machine", "machine 'gpu' is not among its machines (cpu)"),
    ("other run", "not of"),
    ("late checkpoint", "--from-checkpoint 2000: the candidate's snapshots"),
])
def test_what_cannot_be_installed_is_refused_and_nothing_changes(tmp_path, capsys, breaks,
                                                                 message):
    args = {**ARGS, "init_weights": None} if breaks == "scratch" else (
        {**ARGS, "anatomy_cases": 100} if breaks == "anatomy" else ARGS)
    weights, run, out = setup(tmp_path, args, record=breaks != "unrecorded")
    argv = [str(out), "--rule", "R-x", "--run", str(run), "--machine", "cpu", "--weights",
            str(weights)]
    if breaks == "nothing ships":
        verdict = json.loads((out / "rule.json").read_text())
        (out / "rule.json").write_text(json.dumps({**verdict, "ships": None}))
    elif breaks == "other network":
        (out / "candB" / "localization.weights.h5").write_bytes(b"another")
    elif breaks == "pseudo":
        provenance = json.loads((weights / "weights.json").read_text())
        provenance["segmentation"]["pseudo_labels"]["rounds"][0]["folder"] = "RUNS/other"
        (weights / "weights.json").write_text(json.dumps(provenance))
    elif breaks == "partial":
        provenance = json.loads((weights / "weights.json").read_text())
        provenance["segmentation"]["partial_labels"]["cases"]["part"] = ["kidney"]
        (weights / "weights.json").write_text(json.dumps(provenance))
    elif breaks == "no data":
        shutil.rmtree(tmp_path / "runs" / "data")
    elif breaks == "machine":
        argv[argv.index("cpu")] = "gpu"
    elif breaks == "other run":
        argv[argv.index(str(run))] = str(tmp_path / "runs" / "pseudo2")
    elif breaks == "late checkpoint":
        argv += ["--from-checkpoint", "2000"]
    before = {p.name: p.read_bytes() for p in weights.iterdir()}
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message.replace("DATA", str(tmp_path / "runs" / "data")) in err, err
    assert unchanged(weights, before)
