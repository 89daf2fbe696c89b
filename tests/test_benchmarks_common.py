"""The helpers every benchmark script shares (benchmarks/common.py)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.common import (
    add_jobs, add_run_config, add_seeds_and_rounds, benchmark_parser, command_line, mean_std, rounded,
    save_report,
)


def test_parser_has_the_shared_options_and_describes_the_script(tmp_path):
    parser = benchmark_parser("First paragraph.\n\nDetails.", "smoke run: 1 seed")
    add_seeds_and_rounds(parser)
    add_jobs(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path), "--seeds", "3", "4", "--jobs", "2"])
    assert (args.quick, args.out, args.seeds, args.rounds, args.jobs) == (True, tmp_path, [3, 4], None, 2)
    assert parser.description == "First paragraph."
    assert parser.parse_args([]).out.parts[-2:] == ("benchmarks", "results")


def test_command_line_quotes_what_a_shell_would_split():
    assert command_line("x.py", ["--quick"]) == "python benchmarks/x.py --quick"
    assert command_line("x.py", []) == "python benchmarks/x.py"
    assert command_line("x.py", ["--run-config", "a=1 b=2"]) == "python benchmarks/x.py --run-config 'a=1 b=2'"


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == {"mean": 2.5, "std": pytest.approx(math.sqrt(5 / 3))}
    assert mean_std([7.0]) == {"mean": 7.0, "std": 0.0}


def test_rounded_reaches_floats_inside_dicts_and_lists():
    assert rounded({"a": [0.1234567891, {"b": 2.0000004}], "c": 3, "d": "x"}) == {
        "a": [0.123457, {"b": 2.0}], "c": 3, "d": "x",
    }


def test_save_report_writes_markdown_and_json_and_prints_the_markdown(tmp_path, capsys):
    out = tmp_path / "new" / "folder"
    save_report(out, "bench", "# Title\n", json.dumps({"k": 1}))
    assert (out / "bench.md").read_text() == "# Title\n"
    assert json.loads((out / "bench.json").read_text()) == {"k": 1}
    assert "# Title" in capsys.readouterr().out


def test_run_config_option_parses_flowers_syntax_into_overrides(capsys):
    parser = benchmark_parser("Doc.", "smoke")
    add_run_config(parser, "keys for every run")
    args = parser.parse_args(["--run-config", "lr=0.02 server-momentum=0.9 dataset='mnist1d'"])
    assert args.overrides == {"lr": 0.02, "server-momentum": 0.9, "dataset": "mnist1d"}
    assert parser.parse_args([]).overrides == {}
    for bad, reason in (("lr", "key=value"), ("lr=", "key=value"), ("lr=0.1 momentum", "key=value"),
                        ("lerning-rate=0.1", "unknown run-config key(s) ['lerning-rate']")):
        with pytest.raises(SystemExit):
            parser.parse_args(["--run-config", bad])
        assert reason in capsys.readouterr().err, bad


def test_heterogeneity_run_config_reaches_every_federation_over_its_preset():
    from benchmarks.heterogeneity import federation_jobs, parse_args, run_overrides

    args = parse_args(["--settings", "mnist1d-patho2-k100", "--methods", "fedavg", "fedpa",
                       "--seeds", "0", "1", "--rounds", "20",
                       "--run-config", "server-lr=0.7 server-momentum=0.5"])
    jobs = federation_jobs(args)
    assert [(m, s) for m, _, s, _ in jobs] == [("fedavg", 0), ("fedavg", 1), ("fedpa", 0), ("fedpa", 1)]
    for method, setting, seed, config in jobs:
        preset = run_overrides(method, setting, seed, 20, None)
        assert (preset["server-lr"], preset["server-momentum"]) != (0.7, 0.5)  # so it shows
        assert config == preset | {"server-lr": 0.7, "server-momentum": 0.5}
        assert config["fraction-train"] == 0.1 and config["num-server-rounds"] == 20
    # without it, the presets as they are
    plain = federation_jobs(parse_args(["--settings", "mnist1d-patho2", "--methods", "fedpa",
                                        "--seeds", "0", "--rounds", "20"]))
    assert [c for *_, c in plain] == [run_overrides("fedpa", "mnist1d-patho2", 0, 20, None)]
