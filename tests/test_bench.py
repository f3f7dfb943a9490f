"""The benchmark: the device check's CPU dry run (`scripts/device_check.sh OUT --device cpu --tiny`) measures every
setting or names why it skipped it, and the harness keeps its promises (a setting past its deadline is cut off, one
that does not fit is skipped, the JSON is written after every setting)."""

import json
import os
import pathlib
import subprocess
import sys
import time

from dimple_tools.bench import benchmark as bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_device_check_dry_run_on_the_cpu(tmp_path):
    start = time.monotonic()
    result = subprocess.run(["bash", "scripts/device_check.sh", str(tmp_path), "--device", "cpu", "--tiny"],
                            capture_output=True, text=True, cwd=str(ROOT), timeout=600,
                            env={**os.environ, "PYTHON": sys.executable})
    wall = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # the last line is the JSON summary
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["summary"] == summary and summary["errors"] == {}
    assert "skipped" in report["meta"]["tests"]  # the CUDA tests ran (and skipped: no GPU)
    settings = report["settings"]
    assert list(settings) == list(bench.SETTINGS)
    for name, entry in settings.items():
        assert entry["status"] in ("ok", "skipped"), (name, entry)
        assert entry["status"] == "ok" or entry["reason"]  # a skipped setting says why
    has_qwen2_5_vl = hasattr(__import__("transformers"), "Qwen2_5_VLConfig")  # from transformers 4.49 on
    for name in ("floor", "pass", "answer64", "batch", "long256", "compile") + (("baseline",) if has_qwen2_5_vl else ()):
        assert settings[name]["status"] == "ok", name  # the dry run fits them all
    if not has_qwen2_5_vl:
        assert "no Qwen2.5-VL" in settings["baseline"]["reason"]
    assert settings["answer64"]["steps22"]["passes"] == 22 and settings["answer64"]["steps22"]["masks_left"] == 0
    assert settings["batch"]["batch16_dual"]["tokens_per_s"] > 0 and settings["long256"]["dual_speedup"] > 0
    assert settings["compile"]["tokens_equal_eager"]  # regional compilation: the eager tokens (fp32, CPU)
    assert summary["floor_ms"] > 0 and summary["first_compiled_answer_s"] > 0
    assert not has_qwen2_5_vl or summary["baseline_tokens_per_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert wall < 180, f"the dry run took {wall:.0f} s (target: under 2 minutes on an idle machine)"


def test_settings_are_cut_off_skipped_and_saved_one_by_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "b.json"

    def quick(h, result):
        result["value"] = 1

    def saved_so_far(h, result):
        result["saved"] = list(json.loads(out.read_text())["settings"])  # the JSON after the previous setting

    def slow(h, result):
        result["before_cut"] = True
        time.sleep(5)

    settings = {"quick": (quick, 9, 1), "saved": (saved_so_far, 9, 1), "slow": (slow, 9, 0.5), "big": (quick, 9, 60)}
    monkeypatch.setattr(bench, "SETTINGS", settings)
    assert bench.main(["--device", "cpu", "--tiny", "--settings", "quick,saved,slow,big", "--deadline", "30",
                       "--out", str(out), "--plot", "none"]) is None  # the report is the JSON (exit status 0)
    report = json.loads(out.read_text())
    s = report["settings"]
    assert s["quick"]["status"] == "ok" and s["saved"]["saved"] == ["quick"]
    assert s["slow"]["status"] == "timeout" and s["slow"]["before_cut"] and s["slow"]["seconds"] < 3
    assert s["big"]["status"] == "skipped" and "needs 60 s" in s["big"]["reason"]
    assert report["summary"]["skipped"] == {"big": s["big"]["reason"]} and list(report["summary"]["errors"]) == ["slow"]
    assert json.loads(out.read_text())["settings"]["big"]["status"] == "skipped"


def test_models_are_built_on_the_meta_device_and_materialised():
    import torch

    from dimple.modeling_dimple import DimpleModel

    with torch.device("meta"):
        model = DimpleModel(bench.tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=16, num_key_value_heads=4))
    model = bench.materialise(model, torch.device("cpu"), torch.float32)
    weight = model.model.layers[0].mlp.gate_proj.weight
    assert weight.device.type == "cpu" and 0.018 < weight.std().item() < 0.022
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert not model.model.layers[0].self_attn.q_proj.bias.any()
