"""Several `dimple-serve` replicas behind one endpoint (issue 35 item 4): the deployment files of docs/deploy
(containers behind nginx, or a Kubernetes Deployment behind a Service) run only real `dimple-serve` flags and
probe the routes a balancer needs; and two live replicas behave as a balancer expects: each ready on /health,
each answering on its own (its own /metrics), and a stopped one gone from /health while the other answers."""

import concurrent.futures
import pathlib
import re
import shlex
import urllib.error
import urllib.request

import pytest
import yaml

pytest.importorskip("litserve", reason="the server needs LitServe (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the tests talk to the server with the openai client")

from dimple_tools.serving.load import data_url  # noqa: E402
from dimple_tools.serving.process import ServerProcess  # noqa: E402
from dimple_tools.serving.server import build_parser  # noqa: E402
from dimple_tools.tiny.task import answer_is_correct, generate_samples  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "docs" / "deploy"
TINY = ROOT / "tiny-dimple"


def served_flags(command: list) -> object:
    """The parsed flags of a `dimple-serve ...` command line (argparse exits on an unknown flag)."""
    assert command[0] == "dimple-serve", command
    return build_parser().parse_args(command[1:])


def test_the_deployment_files_run_real_flags_and_probe_health():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    replicas = {name: service for name, service in compose["services"].items() if name.startswith("replica-")}
    assert len(replicas) >= 2
    timeouts = set()
    for service in replicas.values():
        args = served_flags(service["command"])
        assert args.host == "0.0.0.0" and args.port == 8000 and args.batching == "continuous"
        timeouts.add(args.request_timeout)
    nginx = (DEPLOY / "nginx.conf").read_text()
    upstream = re.search(r"upstream dimple \{(.*?)\}", nginx, re.S).group(1)
    assert set(re.findall(r"server ([\w-]+):8000", upstream)) == set(replicas)
    assert "proxy_buffering off;" in nginx  # streamed answers pass through as they settle
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", nginx).group(1))
    assert read_timeout > max(timeouts)  # a decode ends (at worst with its 504) before nginx gives up on it
    body_limit = re.search(r"client_max_body_size (\d+)m;", nginx).group(1)
    assert int(body_limit) * 2**20 == build_parser().get_default("max_body_bytes")
    for name in replicas:
        assert compose["services"]["balancer"]["depends_on"][name] == {"condition": "service_healthy"}

    deployment, service = yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = served_flags(container["args"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": args.port}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > args.request_timeout
    assert service["spec"]["ports"][0]["targetPort"] == args.port

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    command = shlex.split(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1).replace('"$DIMPLE_MODEL"', "MODEL"))
    assert served_flags(command).host == "0.0.0.0"
    assert "/health" in re.search(r"^HEALTHCHECK (.+)$", dockerfile, re.M).group(1)


def health(server) -> int:
    try:
        with urllib.request.urlopen(server.base_url + "/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0  # nothing listens: a balancer takes it out


def test_two_replicas_answer_independently_and_a_stopped_one_leaves_health(tmp_path):
    flags = ("--model", str(TINY), "--device", "cpu", "--threads", "1", "--batching", "continuous",
             "--max-batch-size", "4", "--served-model-name", "dimple")
    samples = generate_samples(8, 21)
    with ServerProcess(*flags, log_path=str(tmp_path / "0.log"), startup_timeout=240) as first, \
            ServerProcess(*flags, log_path=str(tmp_path / "1.log"), startup_timeout=240) as second:
        replicas = [first, second]
        assert [health(r) for r in replicas] == [200, 200]
        clients = [openai.OpenAI(base_url=r.base_url + "/v1", api_key="unused", timeout=120, max_retries=0)
                   for r in replicas]

        def ask(i):  # round robin, as a balancer would send them
            image, question, answer, _ = samples[i]
            reply = clients[i % 2].chat.completions.create(model="dimple", max_tokens=48, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": question}]}])
            return reply.choices[0].message.content, answer

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, range(8)))
        assert sum(answer_is_correct(text, answer) for text, answer in replies) >= 7
        assert [r.metric("rows_decoded") for r in replicas] == [4, 4]  # each decoded its own share

        first.stop()
        assert health(first) == 0 and health(second) == 200
        text, answer = ask(1)  # the remaining replica still answers
        assert answer_is_correct(text, answer)
