"""Rules of the data plans and the run folder that need no training (xpnet.captcha.plans, .run_folder)."""

import json

import pytest

from xpnet.captcha.config import Settings, TrainOptions, resolve_settings
from xpnet.captcha.plans import for_small_folder
from xpnet.captcha.run_folder import RUN_FILE, prepare_out, read_saved_settings
from xpnet.errors import DataError, UsageError


def folder_settings(tmp_path, **options):
    return resolve_settings(TrainOptions(data=str(tmp_path), **options))


def test_a_small_folder_gets_new_settings_and_the_old_ones_stay(tmp_path):
    s = folder_settings(tmp_path)
    small, said = for_small_folder(s, 1000)
    assert small is not s and (s.max_shift, s.max_scale, s.model_kwargs) == (2, 0.05, {})
    assert (small.max_shift, small.max_scale, small.model_kwargs) == (3, 0.1, {"batchnorm": True})
    assert said.startswith("fewer than 5,000 training images: captcha_net with BatchNorm")


def test_large_folders_synthetic_runs_and_chosen_models_keep_their_network(tmp_path):
    s = folder_settings(tmp_path)
    assert for_small_folder(s, 5000) == (s, None)
    synthetic = resolve_settings(TrainOptions())
    assert for_small_folder(synthetic, 10) == (synthetic, None)
    chosen, said = for_small_folder(folder_settings(tmp_path, model="captcha_net"), 10)
    assert chosen.model_kwargs == {} and chosen.max_shift == 3
    assert said == ("fewer than 5,000 training images: shifts of up to 3 px and scales of up to 10%, distortions "
                    "rotate 4, shear 0.15, elastic 0.8, noise 6, blur 0.2, contrast 0.2, label smoothing 0.1")
    assert chosen.distort == chosen.folder_small["distort"]


def test_a_small_folder_gets_the_configured_distortions_unless_the_user_chose(tmp_path):
    extra = {"rotate": 3.0, "noise": 4.0}
    s = folder_settings(tmp_path)
    s = s.replace(folder_small={**s.folder_small, "distort": extra})
    small, said = for_small_folder(s, 1000)
    assert small.distort == extra and said.endswith("distortions rotate 3, noise 4, label smoothing 0.1")
    mine = folder_settings(tmp_path, distort="blur=0.2")
    mine = mine.replace(folder_small={**mine.folder_small, "distort": extra})
    assert for_small_folder(mine, 1000)[0].distort == {"blur": 0.2}
    assert for_small_folder(s, 5000)[0].distort == s.distort  # large folders: as configured


def test_a_small_folder_gets_label_smoothing_unless_the_user_chose(tmp_path):
    s = folder_settings(tmp_path)
    assert s.label_smoothing == 0.0 and for_small_folder(s, 1000)[0].label_smoothing == 0.1
    assert for_small_folder(s, 5000)[0].label_smoothing == 0.0
    for mine in (0.0, 0.3):
        assert for_small_folder(folder_settings(tmp_path, label_smoothing=mine), 1000)[0].label_smoothing == mine
    assert resolve_settings(TrainOptions(label_smoothing=0.2)).label_smoothing == 0.2
    for bad in (1.0, -0.1):
        with pytest.raises(UsageError, match="--label-smoothing"):
            folder_settings(tmp_path, label_smoothing=bad)


def test_saved_settings_are_read_back_and_damage_is_one_sentence(tmp_path):
    s = resolve_settings(TrainOptions(seed=5)).replace(train_images_made=77)
    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": s.to_dict()}))
    assert Settings.from_dict(read_saved_settings(tmp_path)) == s
    # a run.json of an earlier version, without the keys added since (they have defaults), still resumes
    old = {k: v for k, v in s.to_dict().items() if k in Settings.required_names() | {"train_images_made"}}
    assert {"head", "min_length", "init"}.isdisjoint(old)
    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": old}))
    assert Settings.from_dict(read_saved_settings(tmp_path)).head == "bce"  # what earlier versions trained
    for damaged in ("{", json.dumps({"nothing": 1}), json.dumps({"settings": {"lr": 1}}),
                    json.dumps({"settings": {**s.to_dict(), "surprise": 1}})):
        (tmp_path / RUN_FILE).write_text(damaged)
        with pytest.raises(DataError, match="is damaged .*cannot resume this run"):
            read_saved_settings(tmp_path)


def test_the_output_folder_is_new_or_a_run_to_resume(tmp_path):
    assert prepare_out(tmp_path / "new", resume=False).is_dir()
    with pytest.raises(UsageError, match="no run to resume"):
        prepare_out(tmp_path / "new", resume=True)
    (tmp_path / "new" / RUN_FILE).write_text("{}")
    with pytest.raises(UsageError, match="already holds a run"):
        prepare_out(tmp_path / "new", resume=False)
    assert prepare_out(tmp_path / "new", resume=True) == tmp_path / "new"
