"""Tests of Dimple's lmms-eval model (`dimple_tools/evaluation/model.py`, `lmms_eval_settings.py`) and `make eval-tiny`.

* The decoding settings a request turns into (no lmms-eval needed): the release's defaults (8 tokens / 8 steps,
  maskgit_plus, dream; 64 / 64 for open-ended tasks) in place of a task YAML's autoregressive budget; explicit
  settings (a request with `steps`) taken as given; generic callers' neutral values (num_beams=1,
  temperature=None, do_sample=False with top_p=None, videos=[], use_cache=True) accepted, and accepted by
  `diffusion_generate`; beam search, repetition penalties, unknown settings and videos refused; images placed
  where the context's placeholders say.
* With lmms-eval 0.7.3 in `.venv-eval` (`make eval-deps`, run by `make test`): the entry point resolves
  `--model dimple` through lmms-eval's registry (registry_v2); log-likelihood requests, multi-round requests and
  video inputs raise the clear errors; `make eval-tiny` (lmms-eval's command line on the shipped tiny model and
  the local task of 200 generated questions) prints the results table with accuracy >= 0.85, answers equal to
  `diffusion_generate`'s called directly, and the throughput block; `make eval-tiny EVAL_PROCESSES=2` (two CPU
  processes through `accelerate launch`) gives the same answers and score.

The lmms-eval tests skip, saying why, only where `.venv-eval` cannot import lmms-eval (`make eval-deps` could
not install it) or `tiny-dimple/` is not built. Nothing is downloaded: the runs set the Hub offline.
"""

import glob
import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from dimple_tools.evaluation.settings import (
    OPEN_ENDED_LENGTH,
    RELEASE_SETTINGS,
    DimpleEvalError,
    build_content,
    decoding_settings,
    is_open_ended,
    visual_kind,
)
from dimple_tools.evaluation.shapes import DEFAULT_N as N  # questions of the local task

REPO = Path(__file__).resolve().parents[1]
EVAL_PY = REPO / ".venv-eval" / "bin" / "python"
TINY = REPO / "tiny-dimple"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# What MME's YAML gives every model (lmms_eval/tasks/mme/mme.yaml).
MME_YAML = {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}


# --------------------------------------------------------------------------------------------------
# Settings and prompts (the model's packages alone)
# --------------------------------------------------------------------------------------------------


def test_task_yaml_budget_is_replaced_by_the_release_settings():
    settings, stops, seed, ignored = decoding_settings("mme", MME_YAML)
    assert settings == RELEASE_SETTINGS
    assert settings["max_new_tokens"] == 8 and settings["steps"] == 8
    assert settings["alg"] == "maskgit_plus" and settings["decoding_pipeline"] == "dream"
    assert stops == ["\n\n"] and seed is None
    assert ignored == {"max_new_tokens": 16, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    # Open-ended tasks (the release's MM-Vet setting), by task name; more names through the model argument.
    mmvet, _, _, ignored = decoding_settings("mmvet", {"max_new_tokens": 1024, "temperature": 0.2, "do_sample": False})
    assert (mmvet["max_new_tokens"], mmvet["steps"]) == (OPEN_ENDED_LENGTH, OPEN_ENDED_LENGTH) == (64, 64)
    assert mmvet["temperature"] == 0.0 and ignored["temperature"] == 0.2
    assert is_open_ended("llava_in_the_wild") and is_open_ended("mmvet_v2") and not is_open_ended("mmvetx")
    assert not is_open_ended("mmmu_val") and not is_open_ended("my_captions")
    assert decoding_settings("my_captions", {}, ("my_captions",))[0]["max_new_tokens"] == 64
    # Open-ended decoding up to a bound, asked for in --gen_kwargs (strings as lmms-eval parses them)
    opened, *_ = decoding_settings("mmvet", {"open_ended": "true", "max_new_tokens": 256, "steps": 256})
    assert (opened["open_ended"], opened["max_new_tokens"], opened["steps"]) == (True, 256, 256)
    # Diffusion settings count without `steps` (no task YAML sets them).
    settings, *_ = decoding_settings("mme", {**MME_YAML, "alg": "origin", "alg_p_threshold": 0.95})
    assert (settings["alg"], settings["alg_p_threshold"], settings["max_new_tokens"]) == ("origin", 0.95, 8)


def test_settings_with_steps_are_taken_as_given():
    gen_kwargs = {**MME_YAML, "max_new_tokens": 32, "steps": 16.0, "alg": "entropy", "alg_p_threshold": 0.9,
                  "decoding_pipeline": "dim", "use_cache": "false", "block_length": 8, "dual_cache": True,
                  "stop_at_eos": "true", "use_original_confidence": True, "top_p": "None"}
    settings, stops, _, ignored = decoding_settings("mme", gen_kwargs)
    assert ignored == {}
    assert settings == {**RELEASE_SETTINGS, "max_new_tokens": 32, "steps": 16, "alg": "entropy", "alg_p_threshold": 0.9,
                        "decoding_pipeline": "dim", "use_cache": False, "block_length": 8, "dual_cache": True,
                        "stop_at_eos": True, "use_original_confidence": True, "top_p": None}
    # The release's command line (yu-rp/Dimple lmms-eval/examples/models/dimple.sh) reproduces the defaults.
    release_cli = {"max_new_tokens": 8, "steps": 8, "temperature": 0.0, "top_p": 0.01, "alg": "maskgit_plus",
                   "alg_temp": 0.0, "use_cache": True, "alg_p_threshold": 0.0, "use_original_confidence": False,
                   "decoding_pipeline": "dream"}
    assert decoding_settings("mme", {**MME_YAML, **release_cli})[0] == RELEASE_SETTINGS
    # Sampling: a temperature, or transformers' do_sample switch (temperature 1.0), with a seed.
    sampled, _, seed, _ = decoding_settings("t", {"steps": 8, "temperature": 0.7, "seed": 3})
    assert sampled["temperature"] == 0.7 and seed == 3
    assert decoding_settings("t", {"steps": 8, "do_sample": True})[0]["temperature"] == 1.0
    # do_sample=False decodes greedily at any temperature, as transformers' generate does.
    assert decoding_settings("t", {"steps": 8, "do_sample": False, "temperature": 0.2})[0]["temperature"] == 0.0
    # top_p=0 (POPE's YAML): the most probable token alone.
    settings, *_ = decoding_settings("pope", {"steps": 8, "top_p": 0})
    assert settings["top_p"] is None and settings["top_k"] == 1


NEUTRAL = {"steps": 8, "num_beams": 1, "temperature": None, "do_sample": False, "top_p": None, "videos": [], "use_cache": True}


def test_generic_callers_neutral_values_are_accepted():
    settings, _, _, ignored = decoding_settings("t", NEUTRAL)
    assert ignored == {}
    assert settings == {**RELEASE_SETTINGS, "temperature": 0.0, "top_p": None, "use_cache": True}
    # Without `steps` too (they are then the task's and replaced by the defaults).
    assert decoding_settings("t", {k: v for k, v in NEUTRAL.items() if k != "steps"})[0] == RELEASE_SETTINGS


@pytest.mark.parametrize(
    "gen_kwargs, message",
    [
        ({"steps": 8, "num_beams": 4}, "num_beams=4"),
        ({"steps": 8, "repetition_penalty": 1.2}, "repetition_penalty=1.2"),
        ({"steps": 8, "do_sample": True, "temperature": 0}, "sampling needs a temperature"),
        ({"step": 8}, "unknown generation settings for Dimple: ['step']"),
        ({"videos": ["clip.mp4"]}, "images only"),
        ({"use_cache": "maybe"}, "`use_cache` must be true or false"),
        ({"until": 3}, "`until` must be a string or a list of strings"),
    ],
)
def test_what_diffusion_cannot_apply_is_refused(gen_kwargs, message):
    with pytest.raises(DimpleEvalError, match=re.escape(message)):
        decoding_settings("t", gen_kwargs)


def test_images_are_placed_where_the_context_says():
    a, b, c = "A", "B", "C"  # stand-ins for images
    # MMMU: numbered placeholders name the task's images in increasing order (here images 2 and 5 of the doc).
    content = build_content("Compare <image 2> with <image 5>. Which?", [a, b])
    assert content == [{"type": "text", "text": "Compare "}, {"type": "image", "image": a},
                       {"type": "text", "text": " with "}, {"type": "image", "image": b},
                       {"type": "text", "text": ". Which?"}]
    # A placeholder used twice gives its image twice; images no placeholder names come first.
    content = build_content("<image 1> and <image 1>?", [a, b, c][:1])
    assert [item.get("image") for item in content] == [a, None, a, None]
    content = build_content("Is <image 1> red?", [a, b, c])  # counts differ: image N is the N-th
    assert [item.get("image", item.get("text")) for item in content] == [b, c, "Is ", a, " red?"]
    # Plain <image> placeholders, as many as images: each in turn.
    content = build_content("<image>\nFirst.\n<image>\nSecond?", [a, b])
    assert [item.get("image", item.get("text")) for item in content] == [a, "\nFirst.\n", b, "\nSecond?"]
    # Otherwise: the images, then the text (a stray placeholder removed).
    assert build_content("What is it?<image>", [a, b]) == [
        {"type": "image", "image": a}, {"type": "image", "image": b}, {"type": "text", "text": "What is it?"}]
    assert build_content("No image.", []) == [{"type": "text", "text": "No image."}]


def test_video_and_audio_inputs_are_recognised():
    assert visual_kind("/data/clip.MP4") == "video" and visual_kind({"type": "video", "video": "x"}) == "video"
    assert visual_kind({"array": [0.0], "sampling_rate": 16000}) == "audio" and visual_kind("a.wav") == "audio"
    assert visual_kind("photo.jpg") is None and visual_kind(Image.new("RGB", (2, 2))) is None


# --------------------------------------------------------------------------------------------------
# lmms-eval (in .venv-eval)
# --------------------------------------------------------------------------------------------------


def _eval_env():
    return {**os.environ, **OFFLINE, "HF_HOME": str(REPO / ".cache" / "lmms-eval-hf")}


@pytest.fixture(scope="module")
def lmms_eval_python():
    if not (TINY / "config.json").is_file():
        pytest.skip("tiny-dimple/ is not built (`make tiny-dimple`): the lmms-eval tests use the shipped tiny model")
    if not EVAL_PY.is_file():
        pytest.skip("lmms-eval is not installed: no .venv-eval (`make eval-deps` installs requirements-eval.txt there)")
    probe = subprocess.run([str(EVAL_PY), "-c", "import lmms_eval.models, dimple_tools.evaluation.model"],
                           cwd=REPO, env=_eval_env(), capture_output=True, text=True, timeout=300)
    if probe.returncode:
        reason = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"lmms-eval cannot be imported in .venv-eval (`make eval-deps` reinstalls it): {reason}")
    return EVAL_PY


PROBE = r"""
import json, sys
from importlib.metadata import entry_points
from lmms_eval.models import MODEL_REGISTRY_V2, get_model, get_model_manifest
from lmms_eval.api.instance import Instance

out = {}
out["entry_points"] = [f"{ep.name}={ep.value}" for ep in entry_points(group="lmms_eval.models")]
resolved = MODEL_REGISTRY_V2.resolve("dimple")
out["resolved"] = [resolved.model_id, resolved.model_type, resolved.class_path]
cls = get_model("dimple")
out["class"] = f"{cls.__module__}.{cls.__qualname__}"
out["is_simple"] = cls.is_simple

lm = cls.create_from_arg_string("pretrained=tiny-dimple,device=cpu", {"batch_size": "4", "max_batch_size": None, "device": None})
out["batch_size"] = lm.batch_size
meta = {"task": "t", "doc_id": 0, "repeats": 1}
def error_of(call):
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None
likelihood = Instance("loglikelihood", ("Question?", " yes", lambda doc: [], 0, "t", "test"), 0, meta)
out["loglikelihood"] = error_of(lambda: lm.loglikelihood([likelihood]))
multi = Instance("generate_until_multi_round", ("Q", {}, None, None, 0, "t", "test"), 0, meta)
out["multi_round"] = error_of(lambda: lm.generate_until_multi_round([multi]))
lm.task_dict = {"t": {"test": [{"video": "/data/clip.mp4"}]}}
video = Instance("generate_until", ("What happens?", {"until": ["\n"]}, lambda doc: [doc["video"]], 0, "t", "test"), 0, meta)
out["video"] = error_of(lambda: lm.generate_until([video]))
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(lmms_eval_python):
    run = subprocess.run([str(lmms_eval_python), "-c", PROBE], cwd=REPO, env=_eval_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


def test_entry_point_resolves_dimple_through_lmms_evals_registry(probe):
    assert "dimple=dimple_tools.evaluation.plugin:manifest" in probe["entry_points"]
    assert probe["resolved"] == ["dimple", "simple", "dimple_tools.evaluation.model.Dimple"]
    assert probe["class"] == "dimple_tools.evaluation.model.Dimple" and probe["is_simple"] is True
    assert probe["batch_size"] == 4


def test_loglikelihood_multi_round_and_video_raise_clear_errors(probe):
    assert probe["loglikelihood"].startswith("NotImplementedError: Dimple cannot score log-likelihood requests")
    assert "generate_until variant" in probe["loglikelihood"]
    assert probe["multi_round"].startswith("NotImplementedError: Dimple does not implement multi-round generation")
    assert probe["video"].startswith("DimpleEvalError: Dimple evaluates images only: task 't' gives video input")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_tiny(tmp: Path, processes: int = 1):
    """`make eval-tiny` into `tmp` (the environments are not remade here: `make test` made them) ->
    (stdout, results JSON, samples by doc id)."""
    command = ["make", "--no-print-directory", "-o", ".venv/.installed", "-o", ".venv-eval/.installed", "eval-tiny",
               f"EVAL_OUT={tmp / 'out'}", f"EVAL_TASKS_DIR={tmp / 'tasks'}", f"EVAL_PROCESSES={processes}",
               f"EVAL_PORT={_free_port()}"]
    run = subprocess.run(command, cwd=REPO, env=_eval_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results_path,) = glob.glob(str(tmp / "out" / "*" / "*_results.json"))
    (samples_path,) = glob.glob(str(tmp / "out" / "*" / "*_samples_dimple_shapes.jsonl"))
    with open(samples_path) as f:
        samples = {row["doc_id"]: row for row in map(json.loads, f)}
    return run.stdout + run.stderr, json.loads(Path(results_path).read_text()), samples


@pytest.fixture(scope="module")
def one_process(lmms_eval_python, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_tiny_1")
    return (tmp, *_eval_tiny(tmp))


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    model = AutoModel.from_pretrained(TINY, trust_remote_code=True).eval()  # as the lmms-eval class loads it
    return model, processor


# The decoding of the local task (dimple_shapes.yaml's generation_kwargs, as Dimple's lmms-eval class passes them).
TASK_SETTINGS = dict(max_new_tokens=48, steps=48, alg="maskgit_plus", alg_p_threshold=0.9, decoding_pipeline="dim",
                     use_original_confidence=True, temperature=0.0)


def test_eval_tiny_scores_the_tiny_model_as_diffusion_generate_does(one_process, tiny_model):
    from dimple_tools.tiny.build import ask
    from dimple_tools.evaluation.shapes import read_task
    from dimple_tools.tiny.task import answer_is_correct

    tmp, output, results, samples = one_process
    # lmms-eval's results table is printed, with the throughput Dimple reports.
    assert "|dimple_shapes|" in output and "exact_match" in output and "Throughput Summary" in output
    accuracy = results["results"]["dimple_shapes"]["exact_match,none"]
    assert results["n-samples"]["dimple_shapes"]["effective"] == N
    assert accuracy >= 0.85  # the shipped model: 0.865 (63 % of "What is at ...?", docs/training.md)
    throughput = results["throughput"]
    assert throughput["total_gen_tokens"] > 0 and throughput["avg_latency"] > 0
    # confident decoding: far fewer passes than the task's 48 steps
    assert throughput["avg_speed"] > 0 and 1 <= throughput["avg_forward_passes_per_question"] < 8
    assert results["efficiency"]["overall"]["docs_with_token_counts"] == N

    # diffusion_generate called directly, one question at a time, with the task's settings (dimple_shapes.yaml).
    model, processor = tiny_model
    rows = read_task(str(tmp / "tasks"))
    assert len(rows) == len(samples) == N
    direct = []
    for row in rows:
        with Image.open(tmp / "tasks" / "dimple_shapes" / "data" / row["image"]) as image:
            answer, passes = ask(model, processor, image.convert("RGB"), row["question"], **TASK_SETTINGS)
        direct.append(answer)
        assert passes <= TASK_SETTINGS["steps"]
    assert [samples[i]["filtered_resps"] for i in range(N)] == direct
    assert sum(answer_is_correct(a, row["answer"]) for a, row in zip(direct, rows)) / N == accuracy
    assert [samples[i]["token_counts"][0]["output_tokens"] for i in range(N)] == [
        len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in direct]


def test_neutral_values_decode_through_diffusion_generate(tiny_model):
    model, processor = tiny_model
    from dimple_tools.tiny.task import sample_image

    settings, *_ = decoding_settings("t", NEUTRAL)
    messages = [{"role": "user", "content": [{"type": "image", "image": sample_image()},
                                             {"type": "text", "text": "What is at the top left?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    out = model.diffusion_generate(**inputs, return_dict_in_generate=True, **settings)
    assert processor.decode_answers(out.sequences[0], prompt_length=inputs["input_ids"].shape[1]) == "a red circle"


def test_two_processes_under_accelerate_give_the_same_score(one_process, tmp_path_factory):
    _, _, results, samples = one_process
    tmp = tmp_path_factory.mktemp("eval_tiny_2")
    output, results_2, samples_2 = _eval_tiny(tmp, processes=2)
    assert "accelerate.commands.launch --multi_gpu" in output and f"{N // 2}/{N // 2}" in output  # each process: half the questions
    assert results["throughput"]["avg_processes"] == 1 and results_2["throughput"]["avg_processes"] == 2
    one, two = results["results"]["dimple_shapes"], results_2["results"]["dimple_shapes"]
    assert two["exact_match,none"] == one["exact_match,none"] >= 0.85
    assert two["exact_match_stderr,none"] == pytest.approx(one["exact_match_stderr,none"])
    assert results_2["n-samples"]["dimple_shapes"]["effective"] == N
    assert {i: s["filtered_resps"] for i, s in samples_2.items()} == {i: s["filtered_resps"] for i, s in samples.items()}
    assert results_2["throughput"]["total_gen_tokens"] == results["throughput"]["total_gen_tokens"]
