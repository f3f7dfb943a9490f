"""`dimple-serve --batching continuous` (issue 35 item 1): requests join and leave one running batch between
denoising passes. Run as users run it (the shipped tiny model in a subprocess, the openai client); the reference
answers come from `diffusion_generate` alone in this process."""

import concurrent.futures
import pathlib
import time

import pytest

pytest.importorskip("litserve", reason="the server needs LitServe (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the tests talk to the server with the openai client")

import torch  # noqa: E402

from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple.processing_dimple import DimpleProcessor  # noqa: E402
from dimple_tools.serving.load import data_url  # noqa: E402
from dimple_tools.serving.process import ServerProcess  # noqa: E402
from dimple_tools.tiny.task import generate_samples, sample_image  # noqa: E402

TINY = pathlib.Path(__file__).resolve().parents[1] / "tiny-dimple"
MODEL_ID = "tiny-dimple"
TIMEOUT = 120
# Mixed answer lengths: one token per pass, the answer ending at its end-of-text (descriptions take ~40 passes,
# colour and count questions 2).
ONE_PER_PASS = {"alg_p_threshold": 0, "stop_at_eos": True}
# A decode of 256 passes (one random position per pass): long enough to be cancelled or time out.
LONG = {"max_tokens": 256, "seed": 0, "extra_body": {"steps": 256, "alg": "origin", "alg_p_threshold": 0}}


def user(image, question: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                        {"type": "text", "text": question}]}


def start(*flags, log):
    return ServerProcess("--model", str(TINY), "--device", "cpu", "--batching", "continuous", "--threads", "1",
                         *flags, log_path=str(log), startup_timeout=240)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start("--max-batch-size", "16", log=tmp_path_factory.mktemp("serve") / "server.log") as process:
        yield process


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """Two slots, and a request may decode 4 s."""
    with start("--max-batch-size", "2", "--request-timeout", "4",
               log=tmp_path_factory.mktemp("serve") / "server.log") as process:
        yield process


def client_of(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return DimpleModel.from_pretrained(TINY).eval(), DimpleProcessor.from_pretrained(TINY, trust_remote_code=True)


def alone(tiny, image, question, **settings) -> str:
    model, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", split_special_tokens=True)
    settings.setdefault("max_new_tokens", model.generation_config.max_new_tokens)
    with torch.inference_mode():
        out = model.diffusion_generate(**inputs, **settings)
    return processor.decode_answers(out[0], prompt_length=inputs["input_ids"].shape[1])


def ask(client, image, question, stream=False, **kwargs):
    if not stream:
        reply = client.chat.completions.create(model=MODEL_ID, messages=[user(image, question)], **kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=[user(image, question)], stream=True,
                                                 **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None


def test_concurrent_mixed_requests_each_equal_decoding_alone(server, tiny):
    """24 requests at once, descriptions and one-word answers, half streamed, joining the running batch as they
    arrive: every answer is the one `diffusion_generate` gives alone; short answers take fewer passes."""
    client = client_of(server)
    samples = generate_samples(24, 11)
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(ask, client, image, question, stream=i % 2 == 1, max_tokens=48, extra_body=ONE_PER_PASS)
                   for i, (image, question, _, _) in enumerate(samples)]
        replies = [future.result(timeout=TIMEOUT) for future in futures]
    passes = {}
    for (image, question, _, meta), (text, finish, usage) in zip(samples, replies):
        assert text == alone(tiny, image, question, max_new_tokens=48, **ONE_PER_PASS), question
        assert finish == "stop"
        if usage is not None:
            passes.setdefault(meta["question_type"] == "describe", []).append(usage.forward_passes)
    assert max(passes[False]) < min(passes[True]), passes  # each row's own passes, not its batch's


def test_a_short_request_is_answered_while_a_long_one_decodes(server, tiny):
    """A request sent after a 256-pass decode has started joins its running batch and is answered first."""
    client = client_of(server)
    image, (short_image, question, _, _) = sample_image(), generate_samples(1, 3)[0]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(ask, client, image, "Describe the image.", **LONG)
        time.sleep(1.0)
        text, _, _ = ask(client, short_image, question, max_tokens=48)
        assert not long.done(), "the long decode ended before the short request: nothing was shown"
        assert text == alone(tiny, short_image, question, max_new_tokens=48)
        long.result(timeout=TIMEOUT)


def test_stop_strings_and_the_default_canvas(server, tiny):
    client = client_of(server)
    image = sample_image()
    full = alone(tiny, image, "Describe the image.")
    text, finish, usage = ask(client, image, "Describe the image.", stop=[" at"])
    assert (text, finish) == (full[: full.index(" at")], "stop")
    text, finish, _ = ask(client, image, "Describe the image.")  # no max_tokens: the checkpoint's 48-token canvas
    assert (text, finish) == (full, "stop")


def test_open_ended_is_refused_naming_it(server):
    with pytest.raises(openai.BadRequestError) as error:
        ask(client_of(server), sample_image(), "Describe the image.", extra_body={"open_ended": True})
    assert error.value.body["param"] == "open_ended" and "--batching continuous" in error.value.body["message"]


def test_a_cancelled_stream_frees_its_slot(small_server, tiny):
    """Two long decodes fill the two slots; one client goes away: its row leaves at the next pass, and a third
    request is decoded in the freed slot while the other long one still runs."""
    client = client_of(small_server)
    cancelled_before = small_server.metric("rows_cancelled")
    stream = client.chat.completions.create(model=MODEL_ID, messages=[user(sample_image(), "Describe the image.")],
                                            stream=True, **LONG)
    next(iter(stream))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(ask, client, sample_image(), "Describe the image.", **LONG)
        time.sleep(0.5)
        stream.close()
        deadline = time.monotonic() + 10
        while small_server.metric("rows_cancelled") == cancelled_before:
            assert time.monotonic() < deadline, "the cancelled row did not leave the batch"
            time.sleep(0.05)
        image, question, _, _ = generate_samples(1, 5)[0]
        text, _, _ = ask(client, image, question, max_tokens=48)
        assert not other.done(), "the other long decode ended first: the freed slot was not shown to be used"
        assert text == alone(tiny, image, question, max_new_tokens=48)
        with pytest.raises(openai.APIStatusError) as error:  # the other one runs into --request-timeout 4
            other.result(timeout=TIMEOUT)
    assert error.value.status_code == 504 and error.value.body["code"] == "request_timeout"
