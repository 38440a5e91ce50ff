"""The CAPTCHA job's configurations, seeds, settings resolution and the resume merge (xpnet.captcha.config)."""

import dataclasses
import json

import pytest

import xpnet
from xpnet.captcha.config import (CONFIGS, Settings, TrainOptions, derive_seed, get_config,
                                  head_for_labels, merge_resume, resolve_settings, settings_for_head)
from xpnet.data import Charset
from xpnet.errors import UsageError


def test_configurations_are_plain_documented_data():
    for name, cfg in CONFIGS.items():
        assert isinstance(cfg["description"], str) and len(cfg["description"]) > 40, name
        json.dumps(cfg)                                      # plain data: no functions, no objects
        assert cfg["model"] in xpnet.models.MODELS and set(cfg) == set(CONFIGS["default"]), name
    with pytest.raises(UsageError, match="unknown configuration 'nope': choose one of default, long"):
        get_config("nope")


def test_every_configuration_key_is_a_settings_field():
    names = Settings.field_names()
    for cfg in CONFIGS.values():
        assert set(cfg) <= names
    assert names - set(CONFIGS["default"]) == {"config", "data_dir", "seed", "train_images_made", "chosen",
                                               "labels_file", "init", "folds", "fold", "unlabelled_dir"}
    # keys newer than the first run.json files have defaults, so those runs still resume
    old = {k: v for k, v in resolve_settings(TrainOptions()).to_dict().items()
           if k not in ("min_length", "head", "ctc", "chosen", "labels_file", "init", "folds", "fold", "pretrain",
                         "pseudo", "unlabelled_dir", "distort", "stuck_retry")}
    assert Settings.from_dict(old).head == "bce"  # earlier versions trained bce readers only


def test_derived_seeds_differ_and_repeat():
    for seed in (0, 1, 12345, 2 ** 32 - 1):
        v, t = derive_seed(seed, "validation"), derive_seed(seed, "test")
        assert len({seed, v, t}) == 3 and v == derive_seed(seed, "validation")


def test_data_runs_take_the_folder_settings_and_options_still_win(tmp_path):
    synthetic = resolve_settings(TrainOptions(head="bce"))
    assert (synthetic.optimizer, synthetic.lr, synthetic.max_scale) == ("adam", 3e-3, 0.0)
    assert resolve_settings(TrainOptions()).lr == CONFIGS["default"]["ctc"]["lr"]  # the default head is ctc
    assert synthetic.time_budget == CONFIGS["default"]["time_budget"] and synthetic.channels == 1
    folder = resolve_settings(TrainOptions(data=str(tmp_path)))
    assert (folder.lr, folder.max_scale, folder.time_budget) == (1e-3, 0.05, 870)
    assert folder.folder_small["batchnorm"] and folder.width is None and folder.charset is None
    mine = resolve_settings(TrainOptions(data=str(tmp_path), lr=5e-4, time_budget=60, model="captcha_net"))
    assert (mine.lr, mine.time_budget, mine.folder_small["batchnorm"]) == (5e-4, 60.0, False)


def test_resolving_makes_a_new_frozen_object_and_changes_no_configuration(tmp_path):
    before = json.dumps(CONFIGS, sort_keys=True)
    options = TrainOptions(data=str(tmp_path), model="captcha_net_bn", epochs=3)
    a = resolve_settings(options)
    b = resolve_settings(options)
    assert a == b and a is not b and a.folder_small is not b.folder_small
    assert json.dumps(CONFIGS, sort_keys=True) == before     # --data and --model did not reach the configuration
    assert CONFIGS["default"]["folder_small"]["batchnorm"] is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.lr = 1.0
    c = a.replace(width=96)
    assert (c.width, a.width) == (96, None) and c.lr == a.lr


@pytest.mark.parametrize("options, message", [
    (TrainOptions(batch_size=0), "--batch-size must be a positive integer, got 0."),
    (TrainOptions(height=True), "--height must be a positive integer"),
    (TrainOptions(channels=2), "--channels must be 1 (grey) or 3 (RGB), got 2."),
    (TrainOptions(lr=0.0), "--lr must be a finite number > 0"),
    (TrainOptions(time_budget=float("inf")), "--time-budget must be a finite number > 0"),
    (TrainOptions(seed=-1), "--seed must be a non-negative integer, got -1."),
    (TrainOptions(model="nope"), "unknown model 'nope'"),
    (TrainOptions(config="nope"), "unknown configuration 'nope'"),
])
def test_bad_options_are_one_sentence_naming_the_option(options, message):
    with pytest.raises(UsageError) as err:
        resolve_settings(options)
    assert message in str(err.value)


def test_distort_option_is_parsed_checked_and_counts_as_chosen(tmp_path):
    s = resolve_settings(TrainOptions(data=str(tmp_path), distort="rotate=4, noise=6"))
    assert s.distort == {"rotate": 4.0, "noise": 6.0} and "distort" in s.chosen
    assert resolve_settings(TrainOptions(distort="none")).distort == {}
    assert resolve_settings(TrainOptions()).distort == {} and "distort" not in resolve_settings(TrainOptions()).chosen
    for bad, message in (("rotate", "name=value pairs"), ("spin=3", r"unknown distort setting\(s\) spin"),
                         ("blur=2", "blur is a probability")):
        with pytest.raises(UsageError, match=message):
            resolve_settings(TrainOptions(distort=bad))


def test_an_explicit_length_replaces_the_budget_unless_one_is_given_too():
    assert resolve_settings(TrainOptions(epochs=3)).time_budget is None
    assert resolve_settings(TrainOptions(steps=3, time_budget=50)).time_budget == 50.0


def test_settings_round_trip_through_plain_data():
    s = resolve_settings(TrainOptions(seed=7))
    d = s.to_dict()
    assert "train_images_made" not in d and d["seed"] == 7 and d["config"] == "default"
    json.dumps(d)
    assert Settings.from_dict(d) == s
    made = s.replace(train_images_made=1234)
    assert made.to_dict()["train_images_made"] == 1234 and Settings.from_dict(made.to_dict()) == made


def test_resume_merge_keeps_the_saved_run_and_changes_neither_input():
    saved = resolve_settings(TrainOptions(seed=3, batch_size=32)).replace(train_images_made=500).to_dict()
    saved_copy = json.loads(json.dumps(saved))
    fresh = resolve_settings(TrainOptions())
    merged = merge_resume(fresh, saved, TrainOptions())
    assert merged.seed == 3 and merged.batch_size == 32 and merged.train_images_made == 500
    assert saved == saved_copy and fresh.seed == 0 and merged is not fresh
    # the same values given again are fine; a new limit replaces all three limits
    longer = TrainOptions(seed=3, batch_size=32, epochs=9)
    merged = merge_resume(resolve_settings(longer), saved, longer)
    assert (merged.epochs, merged.time_budget, merged.steps) == (9, None, None)
    assert saved == saved_copy


@pytest.mark.parametrize("options, message", [
    (TrainOptions(lr=0.5), "--lr 0.5 differs from the run's 0.005 in run.json: drop it"),
    (TrainOptions(batch_size=8), "--batch-size 8 differs from the run's 64"),
    (TrainOptions(config="quick"), "--config quick differs from the run's 'default'"),
    (TrainOptions(data="somewhere"), "--data "),
])
def test_resume_refuses_options_that_would_change_the_run(options, message):
    saved = resolve_settings(TrainOptions()).to_dict()
    with pytest.raises(UsageError) as err:
        merge_resume(resolve_settings(options), saved, options)
    assert message in str(err.value)


def test_heads_follow_lengths_models_and_options():
    s = resolve_settings(TrainOptions())
    assert (s.head, s.min_length) == (CONFIGS["default"]["fixed_length_head"], None)
    s = resolve_settings(TrainOptions(length="4-6"))   # a range: CTC, with the configuration's ctc settings
    assert (s.head, s.model, s.model_kwargs, s.prior_bias, s.min_length, s.length) == (
        "ctc", "captcha_crnn", {"batchnorm": True}, False, 4, 6)
    s = resolve_settings(TrainOptions(head="ctc", length=5))
    assert (s.head, s.model, s.min_length, s.length, s.lr) == ("ctc", "captcha_crnn", None, 5, CONFIGS["default"]["ctc"]["lr"])
    s = resolve_settings(TrainOptions(head="ctc", lr=1e-4, batch_size=16))  # the user's options win
    assert (s.lr, s.batch_size, s.model) == (1e-4, 16, "captcha_crnn")
    s = settings_for_head(resolve_settings(TrainOptions(data="somewhere", lr=2e-4)), "ctc")
    assert (s.lr, s.model) == (2e-4, "captcha_crnn")
    s = resolve_settings(TrainOptions(model="captcha_crnn"))  # the model says its head; its arguments are kept
    assert (s.head, s.model, s.model_kwargs) == ("ctc", "captcha_crnn", {})
    assert resolve_settings(TrainOptions(head="bce")).model == "captcha_net"
    assert resolve_settings(TrainOptions(data="somewhere")).head == "auto"  # the labels decide
    assert resolve_settings(TrainOptions(data="somewhere", length="3-5")).head == "ctc"
    with pytest.raises(UsageError, match="--length 4-6 is a range of lengths, which the bce head cannot read"):
        resolve_settings(TrainOptions(length="4-6", head="bce"))
    with pytest.raises(UsageError, match="--model captcha_net reads with the bce head, not --head ctc.*captcha_crnn"):
        resolve_settings(TrainOptions(model="captcha_net", head="ctc"))
    with pytest.raises(UsageError, match="--head must be bce or ctc"):
        resolve_settings(TrainOptions(head="sigmoid"))
    with pytest.raises(UsageError, match="--length must be a number of characters"):
        resolve_settings(TrainOptions(length="6-4"))


def test_head_for_labels_of_a_folder():
    auto = resolve_settings(TrainOptions(data="somewhere"))
    assert head_for_labels(auto, Charset("AB", 4)) == CONFIGS["default"]["folder"]["fixed_length_head"]
    assert head_for_labels(auto, Charset("AB", 6, 4)) == "ctc"
    bce = resolve_settings(TrainOptions(data="somewhere", head="bce"))
    with pytest.raises(UsageError, match="the labels have 4-6 characters, which the bce head cannot read.*--head ctc"):
        head_for_labels(bce, Charset("AB", 6, 4))
    ctc = settings_for_head(auto, "ctc")
    assert (ctc.model, ctc.head) == ("captcha_crnn", "ctc") and auto.model == "captcha_net"  # a new object


def test_resume_takes_a_length_range_as_the_run_had_it():
    options = TrainOptions(length="4-6")
    saved = resolve_settings(options).to_dict()
    assert merge_resume(resolve_settings(options), saved, options).min_length == 4
    other = TrainOptions(length="4-5")
    with pytest.raises(UsageError, match="--length 4-5 differs"):
        merge_resume(resolve_settings(other), saved, other)
