"""Command-line checks of dimple_tools.bench.benchmark, dimple_tools.tiny.task and dimple_tools.bench.layer_ops: a bad flag
value ends in argparse's usage message (exit code 2) that names the flag and the values it allows, before any
model is built or file written. Fast: only argument parsing runs."""

import json

import pytest

from dimple_tools.bench import benchmark as bench
from dimple_tools.tiny import task as shapes_task

MISSING = "/nonexistent_dir_for_cli_tests"


def refused(fn, argv, capsys) -> str:
    """Run `fn(argv)`, expect argparse's exit code 2, return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:"), err
    return err


# --------------------------------------------------------------------------------------------------
# dimple_tools/bench/benchmark.py
# --------------------------------------------------------------------------------------------------

BENCH_BAD = [  # (argv, the flag the message names, words of the allowed values)
    (["--gen-kwargs", "notjson"], "--gen-kwargs", ["JSON object"]),
    (["--gen-kwargs", "[1]"], "--gen-kwargs", ["JSON object"]),
    (["--batches", "x"], "--batches", ["integer >= 1"]),
    (["--batches", "1,0,16"], "--batches", ["integer >= 1"]),
    (["--batches", ","], "--batches", ["comma list of integers >= 1"]),
    (["--device", "tpu"], "--device", ["cpu, cuda, cuda:N"]),
    (["--device", "cuda:99"], "--device", ["cpu"]),  # no CUDA here, or fewer than 100 devices
    (["--out", f"{MISSING}/x.json"], "--out", ["existing, writable folder"]),
    (["--repeats", "0"], "--repeats", ["integer >= 1"]),
    (["--repeats", "two"], "--repeats", ["integer >= 1"]),
    (["--layers", "0"], "--layers", ["integer >= 1"]),
    (["--deadline", "-520"], "--deadline", ["number >= 0"]),
    (["--deadline", "inf"], "--deadline", ["number >= 0"]),
    (["--settings", "floor,bogus"], "--settings", ["floor,pass,answer64,batch,long256,baseline"]),
    (["--settings", ","], "--settings", ["floor,pass,answer64"]),
]


@pytest.mark.parametrize("argv, flag, allowed", BENCH_BAD, ids=[" ".join(argv) for argv, _, _ in BENCH_BAD])
def test_bench_refuses_a_bad_flag_value(argv, flag, allowed, capsys):
    err = refused(bench.parse_args, argv, capsys)
    assert f"argument {flag}" in err, err
    for words in allowed:
        assert words in err, err


def test_bench_refuses_a_folder_as_out(tmp_path, capsys):
    err = refused(bench.parse_args, ["--out", str(tmp_path)], capsys)
    assert "argument --out" in err


def test_bench_refuses_a_bad_value_before_the_first_setting(tmp_path, capsys):
    """main() stops in argument parsing: no setting runs, no JSON is written."""
    err = refused(bench.main, ["--device", "cpu", "--tiny", "--settings", "floor", "--repeats", "0",
                               "--out", str(tmp_path / "b.json")], capsys)
    assert "argument --repeats" in err and "[bench]" not in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_bench_accepts_good_values(tmp_path):
    out = tmp_path / "b.json"
    args = bench.parse_args(["--device", "cpu", "--gen-kwargs", '{"use_cuda_graph": false}', "--batches", "1, 2",
                             "--settings", "floor,batch", "--repeats", "3", "--deadline", "0", "--out", str(out)])
    assert args.gen_kwargs == {"use_cuda_graph": False}
    assert args.batches == [1, 2] and args.repeats == 3 and args.deadline == 0
    assert args.selected == ["floor", "batch"] and args.plot == str(tmp_path / "b.png")
    defaults = bench.parse_args(["--device", "cpu", "--out", str(out), "--plot", "none"])
    assert defaults.gen_kwargs == {} and defaults.batches == [1, 4, 16] and defaults.plot is None
    assert defaults.repeats == 1 and defaults.selected == list(bench.SETTINGS)
    assert bench.parse_args(["--device", "cpu", "--out", str(out), "--gen-kwargs", ""]).gen_kwargs == {}


# --------------------------------------------------------------------------------------------------
# dimple_tools/tiny/task.py
# --------------------------------------------------------------------------------------------------

SHAPES_BAD = [
    (["--seed", "-1"], "--seed", "integer >= 0"),
    (["--seed", "x"], "--seed", "integer >= 0"),
    (["--n", "-5"], "--n", "integer >= 1"),
    (["--n", "0"], "--n", "integer >= 1"),
    (["--n", "1e3"], "--n", "integer >= 1"),
    (["--image-size", "50"], "--image-size", "multiple of 28 from 28 to 980"),
    (["--image-size", "0"], "--image-size", "multiple of 28 from 28 to 980"),
    (["--image-size", "-56"], "--image-size", "multiple of 28 from 28 to 980"),
    (["--image-size", "1008"], "--image-size", "multiple of 28 from 28 to 980"),
]


@pytest.mark.parametrize("argv, flag, allowed", SHAPES_BAD, ids=[" ".join(argv) for argv, _, _ in SHAPES_BAD])
def test_shapes_task_refuses_a_bad_flag_value(argv, flag, allowed, tmp_path, capsys):
    out = tmp_path / "data"
    err = refused(shapes_task.main, argv + ["--out", str(out)], capsys)
    assert f"argument {flag}" in err and allowed in err, err
    assert not out.exists()  # refused before anything is written


def test_shapes_task_cli_accepts_the_bounds(tmp_path):
    out = tmp_path / "data"
    assert shapes_task.main(["--out", str(out), "--n", "1", "--seed", "0", "--image-size", "28"]) == 0
    assert len((out / shapes_task.JSONL_NAME).read_text().splitlines()) == 1
    assert json.loads((out / shapes_task.JSONL_NAME).read_text())["meta"]["image_size"] == 28


# --------------------------------------------------------------------------------------------------
# dimple_tools/bench/layer_ops.py
# --------------------------------------------------------------------------------------------------


def test_count_layer_ops_help_and_unknown_arguments(capsys):
    from dimple_tools.bench import layer_ops as count_layer_ops

    with pytest.raises(SystemExit) as exit_info:
        count_layer_ops.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "Operators that one decoder layer dispatches" in out
    for argv in (["--bogus"], ["extra"]):
        err = refused(count_layer_ops.main, argv, capsys)
        assert f"unrecognized arguments: {argv[0]}" in err
