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
    (["--image-size", "27"], "--image-size", "an integer from 28 to 980"),
    (["--image-size", "0"], "--image-size", "an integer from 28 to 980"),
    (["--image-size", "-56"], "--image-size", "an integer from 28 to 980"),
    (["--image-size", "1008"], "--image-size", "an integer from 28 to 980"),
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


# --------------------------------------------------------------------------------------------------
# Every console script of pyproject.toml: exit status 0 on success, non-zero on failure (issue 37)
# --------------------------------------------------------------------------------------------------

import ast  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def console_scripts() -> dict:
    """name -> "module:function" of pyproject.toml's [project.scripts] (read without tomllib: Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


SCRIPTS = console_scripts()


def test_pyproject_lists_the_console_scripts():
    assert {"dimple-train", "dimple-bench", "dimple-shapes", "dimple-web-demo", "dimple-serve"} <= set(SCRIPTS)


def _returned_values(function: ast.FunctionDef) -> list:
    """The `return` statements of `function` itself (not of functions defined inside it)."""
    found, stack = [], list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return):
            found.append(node.value)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _is_exit_status(value) -> bool:
    if value is None or (isinstance(value, ast.Constant) and (value.value is None or type(value.value) is int)):
        return True
    if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub):
        return _is_exit_status(value.operand)
    if isinstance(value, ast.IfExp):
        return _is_exit_status(value.body) and _is_exit_status(value.orelse)
    return False


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_main_returns_none_or_an_exit_status(script):
    """The installed wrapper runs `sys.exit(main())`: anything but None or an int (a metrics dict, a report) is
    printed to stderr and exits with status 1 after a success. Read from the source: no module is imported."""
    module, function = SCRIPTS[script].split(":")
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():  # a package's main (dimple-bench's dispatcher)
        path = ROOT / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    if main.returns is not None:
        assert ast.unparse(main.returns) in ("None", "int", "int | None", "Optional[int]"), ast.unparse(main.returns)
    bad = [ast.unparse(value) for value in _returned_values(main) if not _is_exit_status(value)]
    assert not bad, f"{script}: {module}.{function}() returns {bad}; sys.exit() reads that as a failure"


def installed(script: str) -> str:
    path = pathlib.Path(sys.executable).parent / script
    if not path.is_file():
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    return str(path)


def run_script(script: str, *argv, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run([installed(script), *argv], capture_output=True, text=True, timeout=300, env=env,
                          cwd=cwd or ROOT)


# Successful invocations that take seconds (dimple-train's is in tests/test_training.py, on its tiny model).
CHEAP_RUNS = {
    "dimple-bench": lambda tmp: (["--device", "cpu", "--tiny", "--settings", "floor", "--plot", "none",
                                  "--out", str(tmp / "bench.json")], tmp / "bench.json"),
    "dimple-shapes": lambda tmp: (["--out", str(tmp / "shapes"), "--n", "2"], tmp / "shapes" / shapes_task.JSONL_NAME),
    "dimple-lmms-eval-shapes": lambda tmp: (["--out", str(tmp / "tasks"), "--n", "2"],
                                            tmp / "tasks" / "dimple_shapes" / "data" / "test.jsonl"),
    "dimple-check-layout": lambda tmp: ([], None),
    "dimple-trajectory": lambda tmp: (["--out", str(tmp / "t.png"), "--steps", "2", "--max-new-tokens", "4"],
                                      tmp / "t.png"),
}


@pytest.mark.parametrize("script", sorted(CHEAP_RUNS))
def test_a_successful_run_exits_0(script, tmp_path):
    argv, written = CHEAP_RUNS[script](tmp_path)
    result = run_script(script, *argv)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert written is None or written.is_file()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_bad_flag_exits_non_zero(script, tmp_path):
    result = run_script(script, "--no-such-flag-anywhere", cwd=tmp_path)
    assert result.returncode != 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_a_missing_input_file_exits_non_zero(tmp_path):
    result = run_script("dimple-trajectory", "--image", str(tmp_path / "nowhere.png"), "--out", str(tmp_path / "t.png"))
    assert result.returncode != 0 and not (tmp_path / "t.png").exists()


# --------------------------------------------------------------------------------------------------
# Optional packages: a missing extra is named with what to install, not a bare ModuleNotFoundError
# --------------------------------------------------------------------------------------------------


def without(package: str, code: str, *argv) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter where `package` cannot be imported (as where its extra is not installed)."""
    blocker = f"import sys; sys.modules[{package!r}] = None\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", blocker + code, *argv], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_the_web_demo_without_gradio_says_what_to_install():
    result = without("gradio", "import sys\nfrom dimple_tools.demos.web import main\nsys.exit(main())\n")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "dimple-web-demo needs gradio" in result.stderr
    assert "make web-demo" in result.stderr and "pip install -e '.[demo]'" in result.stderr
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr


def test_the_trajectory_without_matplotlib_says_what_to_install(tmp_path):
    result = without("matplotlib", "import sys\nfrom dimple_tools.demos.trajectory import main\nsys.exit(main())\n",
                     "--out", str(tmp_path / "t.png"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "dimple-trajectory needs matplotlib" in result.stderr and "pip install -e '.[demo]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "t.png").exists()


def test_the_lmms_eval_model_without_lmms_eval_says_what_to_install():
    result = without("lmms_eval", "import dimple_tools.evaluation.model\n")
    assert result.returncode == 1
    assert "needs lmms-eval 0.7, the `eval` extra: pip install -e '.[eval]'" in result.stderr, result.stderr[-3000:]
    assert "ModuleNotFoundError" not in result.stderr
