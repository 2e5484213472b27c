"""weights.json provenance: summaries from run folders, hand-recorded fields and scores kept."""

import json

import pytest

from training.provenance import main, training_seconds


def write_run(folder, iterations, log_rows):
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps({
        "iterations": iterations, "generated": 4, "generated_size": 64, "data": ["data"],
        "data_weight": 0.2, "crop_size": [64, 64, 64], "learning_rate": 2e-4, "ema_decay": 0.999,
        "precision": "bfloat16"}))
    lines = ["iteration,loss,seconds,validation"] + log_rows
    (folder / "log.csv").write_text("\n".join(lines) + "\n")


def test_wall_time_adds_up_resumed_processes(tmp_path):
    write_run(tmp_path / "run", 60, ["20,1.0,10.0,", "40,0.9,25.5,", "60,0.8,7.0,"])
    assert training_seconds(tmp_path / "run" / "log.csv") == 32.5  # 25.5 + 7.0 after the restart


def test_provenance_keeps_scores_notes_and_hand_recorded_fields(tmp_path):
    write_run(tmp_path / "loc", 40, ["20,0.5,10.0,", '40,0.4,20.0,"{""foreground_dsc"": 0.8}"'])
    write_run(tmp_path / "scn", 80, ['80,0.7,30.0,"{""liver"": 0.9}"'])
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "weights.json").write_text(json.dumps({
        "scores": {"real_ct": {"x": 1}}, "notes": "hand note", "use_restrictions": "research",
        "machines": {"epyc": "2-core"}, "model_card": "weights/MODEL_CARD.md",
        "shipping_rules": [{"rule": "R-x", "outcome": "nothing ships"}],
        "real_anatomy": {"sources_and_terms": {"btcv": "research only"}},
        "segmentation": {"iterations": 1, "learning_rate_schedule": "1e-4, then 2e-4"}}))
    main(["--weights", str(weights), "--localization-run", str(tmp_path / "loc"),
          "--segmentation-run", str(tmp_path / "scn"), "--machine", "epyc"])
    provenance = json.loads((weights / "weights.json").read_text())
    assert provenance["scores"] == {"real_ct": {"x": 1}} and provenance["notes"] == "hand note"
    assert provenance["use_restrictions"] == "research" and provenance["machines"] == {
        "epyc": "2-core"} and provenance["model_card"] == "weights/MODEL_CARD.md"
    assert provenance["shipping_rules"] == [{"rule": "R-x", "outcome": "nothing ships"}]
    assert provenance["real_anatomy"] == {"sources_and_terms": {"btcv": "research only"}}
    assert provenance["license"] == "Apache-2.0" and "machine" not in provenance
    assert provenance["segmentation"]["machine"] == provenance["localization"]["machine"] == "epyc"
    assert provenance["segmentation"]["iterations"] == 80  # from the run, not the old file
    assert provenance["segmentation"]["learning_rate_schedule"] == "1e-4, then 2e-4"
    assert provenance["segmentation"]["last_validation"] == {"liver": 0.9}
    assert provenance["localization"]["training_wall_seconds"] == 20.0
    assert provenance["preprocessing"]["crop_padding_hu"] == -1024.0


def test_iterations_are_those_of_the_latest_checkpoint_not_the_target(tmp_path):
    """A run stopped before its --iterations target: the exported weights are the checkpoint's."""
    import tensorflow as tf

    from training.provenance import run_summary

    run = tmp_path / "run"
    write_run(run, 1000, ['50,0.7,30.0,"{""liver"": 0.8}"', "60,0.6,40.0,",
                          '100,0.5,70.0,"{""liver"": 0.9}"', "120,0.5,85.0,"])
    assert run_summary(run)["iterations"] == 120  # no checkpoint: the log's last iteration
    iteration = tf.Variable(60, dtype=tf.int64)
    tf.train.CheckpointManager(tf.train.Checkpoint(iteration=iteration), run / "checkpoints",
                               max_to_keep=2).save()
    summary = run_summary(run)
    assert summary["iterations"] == 60
    assert summary["training_wall_seconds"] == 40.0  # rows after the checkpoint left out
    assert summary["last_validation"] == {"liver": 0.8}


def test_a_fine_tuned_network_adds_up_its_runs(tmp_path):
    write_run(tmp_path / "loc", 40, ["40,0.4,20.0,"])
    write_run(tmp_path / "scn", 80, ["40,0.8,12.0,", '80,0.7,30.0,"{""liver"": 0.9}"'])
    write_run(tmp_path / "tune", 30,
              ["10,0.6,8.0,", "20,0.6,5.0,", '30,0.5,9.0,"{""liver"": 0.95}"'])
    weights = tmp_path / "weights"
    weights.mkdir()
    main(["--weights", str(weights), "--localization-run", str(tmp_path / "loc"),
          "--segmentation-run", str(tmp_path / "scn"), str(tmp_path / "tune")])
    segmentation = json.loads((weights / "weights.json").read_text())["segmentation"]
    assert segmentation["iterations"] == 110
    assert segmentation["training_wall_seconds"] == 30.0 + 8.0 + 9.0  # the fine-tune resumed once
    assert segmentation["last_validation"] == {"liver": 0.95}  # the last run's
    assert [(r["run"], r["iterations"]) for r in segmentation["runs"]] == [("scn", 80),
                                                                          ("tune", 30)]
    assert "runs" not in json.loads((weights / "weights.json").read_text())["localization"]


def test_extend_appends_a_run_to_the_recorded_chain_and_keeps_the_other_network(tmp_path):
    """The earlier run folders are gone (a fresh machine): weights.json's chain is continued."""
    write_run(tmp_path / "more", 30, ["10,0.6,8.0,", '30,0.5,20.0,"{""liver"": 0.97}"'])
    weights = tmp_path / "weights"
    weights.mkdir()
    localization = {"iterations": 40, "training_wall_seconds": 20.0, "precision": "float32"}
    (weights / "weights.json").write_text(json.dumps({
        "localization": localization, "notes": "hand note",
        "segmentation": {"iterations": 110, "training_wall_seconds": 47.0, "export": "by hand",
                         "runs": [{"run": "scn", "iterations": 80, "training_wall_seconds": 30.0},
                                  {"run": "tune", "iterations": 30,
                                   "training_wall_seconds": 17.0}]}}))
    main(["--weights", str(weights), "--segmentation-run", str(tmp_path / "more"), "--extend"])
    provenance = json.loads((weights / "weights.json").read_text())
    segmentation = provenance["segmentation"]
    assert segmentation["iterations"] == 140
    assert segmentation["training_wall_seconds"] == 67.0
    assert [(r["run"], r["iterations"]) for r in segmentation["runs"]] == [
        ("scn", 80), ("tune", 30), ("more", 30)]
    assert segmentation["last_validation"] == {"liver": 0.97}
    assert segmentation["export"] == "by hand"
    assert provenance["localization"] == localization and provenance["notes"] == "hand note"


def test_extend_refuses_a_recorded_network_without_iterations(tmp_path, capsys):
    write_run(tmp_path / "more", 30, ["30,0.5,20.0,"])
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "weights.json").write_text(json.dumps({
        "localization": {"iterations": 40, "training_wall_seconds": 20.0},
        "segmentation": {"learning_rate_schedule": "by hand"}}))
    with pytest.raises(SystemExit):
        main(["--weights", str(weights), "--segmentation-run", str(tmp_path / "more"),
              "--extend"])
    assert "records no iterations" in capsys.readouterr().err
    assert json.loads((weights / "weights.json").read_text())["segmentation"] == {
        "learning_rate_schedule": "by hand"}


def test_extend_counts_a_recorded_network_without_a_runs_list_as_one_run(tmp_path):
    """weights.json written from a single run has no ``runs`` list: extending it makes the recorded
    entry the chain's first run, named "recorded", with its own iterations and settings."""
    write_run(tmp_path / "more", 30, ["30,0.5,20.0,"])
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "weights.json").write_text(json.dumps({
        "localization": {"iterations": 40, "training_wall_seconds": 20.0},
        "segmentation": {"iterations": 100, "training_wall_seconds": 55.5,
                         "generated_training_cases": 8, "learning_rate": 5e-4,
                         "precision": "float32"}}))
    main(["--weights", str(weights), "--segmentation-run", str(tmp_path / "more"), "--extend"])
    segmentation = json.loads((weights / "weights.json").read_text())["segmentation"]
    assert segmentation["iterations"] == 130
    assert segmentation["training_wall_seconds"] == 75.5
    assert segmentation["runs"] == [
        {"run": "recorded", "iterations": 100, "training_wall_seconds": 55.5,
         "generated_training_cases": 8, "learning_rate": 5e-4, "precision": "float32"},
        {"run": "more", "iterations": 30, "training_wall_seconds": 20.0,
         "generated_training_cases": 4, "learning_rate": 2e-4, "precision": "bfloat16",
         "real_sample_share": 0.2}]
    assert segmentation["learning_rate"] == 2e-4  # the settings are the last run's


def test_a_run_records_its_other_sources_and_seed_in_the_chain(tmp_path):
    """Rendered anatomy, pseudo-labelled folders and the sample seed come from args.json, in the
    summary and in the run's entry of the chain; a run without them records none."""
    from training.provenance import chain_summary

    write_run(tmp_path / "plain", 10, ["10,0.5,5.0,"])
    write_run(tmp_path / "more", 20, ["20,0.4,8.0,"])
    args = json.loads((tmp_path / "more" / "args.json").read_text())
    args.update(anatomy="../shared/anatomy", anatomy_cases=118, anatomy_first_case=118,
                anatomy_weight=0.55, pseudo=["runs/pseudo2"], pseudo_weight=0.1, seed=17,
                image_quality=0.3,
                data=["a", "b"], data_weight=[0.1, 0.05])
    (tmp_path / "more" / "args.json").write_text(json.dumps(args))
    summary = chain_summary([tmp_path / "plain", tmp_path / "more"])
    plain, more = summary["runs"]
    assert more == {"run": "more", "iterations": 20, "training_wall_seconds": 8.0,
                    "generated_training_cases": 4, "learning_rate": 2e-4,
                    "precision": "bfloat16", "real_sample_share": 0.15,
                    "real_sample_share_per_folder": {"a": 0.1, "b": 0.05},
                    "anatomy_training_cases": 118, "anatomy_first_training_case": 118,
                    "anatomy_sample_share": 0.55, "pseudo_label_folders": ["runs/pseudo2"],
                    "pseudo_sample_share": 0.1, "image_quality_share": 0.3,
                    "sample_seed": 17}
    assert not {"anatomy_training_cases", "anatomy_first_training_case", "pseudo_label_folders",
                "image_quality_share", "sample_seed"} & set(plain)
    assert summary["pseudo_sample_share"] == 0.1 and summary["iterations"] == 30
