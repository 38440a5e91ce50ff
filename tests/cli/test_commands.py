"""The CLI's shape: one module per command, the only place with argparse; options map onto TrainOptions."""

import dataclasses
import json
import re
from pathlib import Path

import xpnet
from xpnet import cli
from xpnet.captcha.config import TrainOptions
from xpnet.cli import info
from xpnet.cli import train as train_command

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_outside_the_cli_imports_argparse_or_adds_arguments():
    offenders = []
    for path in sorted((ROOT / "xpnet").rglob("*.py")):
        if path.parent.name == "cli" and path.parent.parent.name == "xpnet":
            continue
        text = path.read_text("utf-8")
        if re.search(r"^\s*(import argparse|from argparse import)", text, re.M) or "add_argument(" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_command_has_its_own_module():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices)[:5] == ["info", "generate", "train", "eval", "predict"]
    for name, p in sub.choices.items():
        func = p.get_default("func")
        assert func.__module__ == f"xpnet.cli.{name}", (name, func.__module__)


def test_train_options_map_onto_train_options(tmp_path):
    args = train_command.build_train_parser().parse_args(
        ["--data", str(tmp_path), "--lr", "5e-4", "--time-budget", "60", "--model", "captcha_net", "--seed", "3"])
    options = train_command.options_from_args(args)
    assert options == TrainOptions(data=str(tmp_path), lr=5e-4, time_budget=60.0, model="captcha_net", seed=3)
    defaults = train_command.options_from_args(train_command.build_train_parser().parse_args([]))
    assert defaults == TrainOptions()
    # every TrainOptions field is an option of the parser (and so of `xpnet train`)
    dests = {a.dest for a in train_command.build_train_parser()._actions}
    assert {f.name for f in dataclasses.fields(TrainOptions)} <= dests


def test_info_prints_the_backend_table(capsys):
    data = xpnet.backend.info()
    info.print_backend_info(data)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["backend", "dtype", "CuPy"] + (
        ["device", "CUDA", "kernels"] if data.get("device") else []) + ["python", "versions"]
    assert lines[0].startswith(f"backend      {data['backend']}  (")
    assert cli.main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == data["backend"]
