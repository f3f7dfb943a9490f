"""The limits an exposed `dimple-serve` needs (issue 35, item 3), each breached by a request: an API key checked as
OpenAI clients send it (Bearer) on every route but /health, the body size before it is read, the image size from
its header before its pixels are decoded, images per request, max_tokens and steps. Each breach is a clear
OpenAI-style 4xx naming the limit, and the server keeps answering.
"""

import base64
import io
import json
import pathlib
import struct
import time
import urllib.error
import urllib.request
import zlib

import pytest

pytest.importorskip("litserve", reason="the server needs LitServe (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the tests talk to the server with the openai client")

from dimple_tools.serving.process import ServerProcess  # noqa: E402
from dimple_tools.tiny.task import sample_image  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "test-key-123"
LIMITS = ("--max-body-bytes", "200000", "--max-image-pixels", "1000000", "--max-images", "2",
          "--max-tokens-limit", "64", "--max-steps", "64", "--open-ended-max-tokens", "64")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess("--model", str(ROOT / "tiny-dimple"), "--device", "cpu", "--threads", "1", "--api-key", KEY,
                       *LIMITS, log_path=str(log), startup_timeout=240) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, timeout=120, max_retries=0)


def png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixel data is a stub: nothing may decode it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def user(text, *images):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": url}} for url in images),
                                         {"type": "text", "text": text}]}]


def http(server, path, body=None, headers=None):
    request = urllib.request.Request(server.base_url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, parsed(response.read())
    except urllib.error.HTTPError as error:
        return error.code, parsed(error.read())


def parsed(body: bytes):
    try:
        return json.loads(body)
    except ValueError:  # /health's "ok", /docs' page
        return body.decode(errors="replace")


def bad(client, status, param, code, **kwargs):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny-dimple", **kwargs)
    error = caught.value
    assert error.status_code == status, error.body
    assert error.body["code"] == code and (param is None or error.body["param"] == param), error.body
    return error.body["message"]


def test_the_api_key_is_asked_on_every_route_but_health(server, client):
    question = {"model": "tiny-dimple", "messages": user("How many shapes are there?", png_url(sample_image()))}
    for path, body in (("/v1/chat/completions", question), ("/v1/models", None), ("/metrics", None),
                       ("/docs", None), ("/openapi.json", None)):
        status, reply = http(server, path, body)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key", (path, status, reply)
        # LitServe's own header is not a key here: OpenAI clients send Bearer
        assert http(server, path, body, {"X-API-Key": KEY})[0] == 401
        assert http(server, path, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert http(server, "/health")[0] == 200
    assert http(server, "/v1/models", headers={"Authorization": f"Bearer {KEY}"})[0] == 200
    reply = client.chat.completions.create(model="tiny-dimple", messages=question["messages"])
    assert reply.choices[0].message.content == "four"


def test_a_huge_image_is_refused_from_its_header_in_under_50_ms(client):
    url = "data:image/png;base64," + base64.b64encode(huge_png_header(12000, 12000)).decode()
    timings = []
    for _ in range(3):  # the best of three: the machine is shared
        start = time.perf_counter()
        message = bad(client, 400, "messages[0].content[0].image_url", "image_too_large",
                      messages=user("Describe the image.", url))
        timings.append(time.perf_counter() - start)
    assert "12000 x 12000 = 144000000 pixels" in message and "--max-image-pixels" in message
    assert min(timings) < 0.05, timings
    assert client.chat.completions.create(model="tiny-dimple", messages=user(
        "How many shapes are there?", png_url(sample_image()))).choices[0].message.content == "four"


def test_each_limit_is_a_4xx_naming_it(client):
    image = png_url(sample_image())
    assert "--max-images" in bad(client, 400, "messages", "too_many_images",
                                 messages=user("Describe the image.", image, image, image))
    assert "--max-tokens-limit" in bad(client, 400, "max_tokens", "invalid_value",
                                       messages=user("Describe the image.", image), max_tokens=65)
    assert "--max-steps" in bad(client, 400, "steps", "invalid_value", messages=user("Describe the image.", image),
                                max_tokens=48, extra_body={"steps": 65})
    assert "--max-body-bytes" in bad(client, 413, None, "body_too_large", messages=user("x" * 250_000))
    # within the limits the same server answers
    reply = client.chat.completions.create(model="tiny-dimple", messages=user("How many shapes are there?", image),
                                           max_tokens=64, extra_body={"steps": 64})
    assert reply.choices[0].message.content == "four"


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory):
    """At most two pending requests, a 2-second decoding deadline."""
    log = tmp_path_factory.mktemp("serve-tight") / "server.log"
    with ServerProcess("--model", str(ROOT / "tiny-dimple"), "--device", "cpu", "--threads", "1",
                       "--max-pending-requests", "2", "--retry-after", "3", "--request-timeout", "2",
                       "--max-batch-size", "1", log_path=str(log), startup_timeout=240) as process:
        yield process


# one token per pass over a 768-token canvas: hundreds of passes, far past a 2-second deadline
LONG = {"max_tokens": 768, "extra_body": {"steps": 768, "alg_p_threshold": 0.0}}


def test_a_full_server_answers_429_with_retry_after_and_a_long_decode_ends_at_its_deadline(tight_server):
    import concurrent.futures

    client = openai.OpenAI(base_url=tight_server.base_url + "/v1", api_key="none", timeout=60, max_retries=0)
    image = png_url(sample_image())

    def long_request():
        start = time.perf_counter()
        try:
            client.chat.completions.create(model="tiny-dimple", messages=user("Describe the image.", image), **LONG)
        except openai.APIStatusError as error:
            return error.status_code, error.body, time.perf_counter() - start
        return 200, None, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = [pool.submit(long_request) for _ in range(2)]
        time.sleep(1.0)  # both admitted (one decoding, one waiting for the worker)
        status, reply = http(tight_server, "/v1/chat/completions",
                             {"model": "tiny-dimple", "messages": user("How many shapes are there?", image)})
        assert status == 429 and reply["error"]["code"] == "too_many_pending_requests", reply
        assert "--max-pending-requests" in reply["error"]["message"]
        request = urllib.request.Request(tight_server.base_url + "/v1/chat/completions", data=json.dumps(
            {"model": "tiny-dimple", "messages": user("How many shapes are there?", image)}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 429 and caught.value.headers["Retry-After"] == "3"
        results = [future.result() for future in running]
    for status, body, seconds in results:
        assert status == 504 and body["code"] == "request_timeout" and "--request-timeout (2 s" in body["message"], body
    # the first ends about 2 s after it started decoding, the second 2 s after its own start (it waited first)
    assert min(seconds for _, _, seconds in results) < 10, results
    # both slots are free again and a short request is answered
    reply = client.chat.completions.create(model="tiny-dimple", messages=user("How many shapes are there?", image))
    assert reply.choices[0].message.content == "four"
    metrics = http(tight_server, "/metrics")[1]
    assert "dimple_rows_timed_out_total 2" in metrics, metrics
