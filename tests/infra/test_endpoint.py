"""The OpenAI-compatible endpoint answers as the seed's section 5 checks by hand: from the
controller (HTTP) and from the host itself (curl), models, chat, thinking on and off, tools,
images for multimodal profiles, metrics, and the API key enforced."""

from __future__ import annotations

import base64
import json
import struct
import urllib.error
import urllib.request
import zlib

import pytest

from tasks.settings import ENV_FILE
from tests.infra.conftest import Secret


@pytest.fixture(scope="session")
def api_key(settings) -> Secret | None:
    """The key as a Secret (tests/infra/conftest.py): what a failed check prints is redacted."""
    return settings.api_key


def request(endpoint: str, path: str, api_key: Secret | None, body: dict | None = None):
    """(status, parsed JSON or text) from the controller.

    The key is revealed only into the request's headers. A request that gets no answer fails
    the check with one line and no traceback: the frames below urlopen hold the headers as an
    argument (http.client's ``request(..., headers)``), and pytest would print them."""
    req = urllib.request.Request(f"{endpoint}{path}", method="POST" if body else "GET",
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key.reveal()}")
    no_answer = None
    try:
        with urllib.request.urlopen(req, timeout=120,
                                    context=getattr(endpoint, "context", None)) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except Exception as error:  # refused, reset, timed out, DNS: the reason, not the frames
        reason = getattr(error, "reason", error)
        no_answer = f"{endpoint}{path}: no answer: {type(reason).__name__}: {reason}"
    if no_answer:  # outside the except block: nothing chained, no frame printed
        pytest.fail(no_answer, pytrace=False)
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def chat(endpoint, api_key, settings, **extra) -> dict:
    body = {"model": settings.profile.served_name, "max_tokens": 16, "temperature": 1,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "Summarize Kimi-K2.6 in one sentence."}],
            **extra}
    status, answer = request(endpoint, "/v1/chat/completions", api_key, body)
    assert status == 200, answer
    return answer


def test_health_from_the_controller(endpoint):
    assert request(endpoint, "/health", None)[0] == 200


def test_health_and_models_from_the_host(unit_host, settings):
    host = unit_host
    curl = " ".join(["curl", "-fsS", *settings.local_curl_options])  # the CA, over TLS
    assert host.run(f"{curl} -o /dev/null {settings.health_url}").rc == 0
    # The key goes to curl on stdin from the root-only env file: never into a command line.
    models = host.run(
        f"sh -c '. {ENV_FILE}; printf \"Authorization: Bearer %s\\n\" \"$VLLM_API_KEY\" "
        f"| {curl} -H @- {settings.local_url}/v1/models'")
    assert models.rc == 0, models.stderr
    assert settings.profile.served_name in [m["id"] for m in json.loads(models.stdout)["data"]]


def test_models_lists_the_served_name(endpoint, api_key, settings):
    status, body = request(endpoint, "/v1/models", api_key)
    assert status == 200
    assert [model["id"] for model in body["data"]] == [settings.profile.served_name]


def test_chat_completion_answers(endpoint, api_key, settings):
    answer = chat(endpoint, api_key, settings)
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["choices"][0]["message"]["role"] == "assistant"


def test_thinking_on_by_default_goes_to_reasoning(endpoint, api_key, settings):
    if not settings.profile.reasoning_parser:
        pytest.skip(f"profile {settings.profile.name} has no reasoning parser")
    message = chat(endpoint, api_key, settings)["choices"][0]["message"]
    assert message["reasoning"], message


@pytest.mark.parametrize("switch", ["thinking", "enable_thinking"])
def test_thinking_off_goes_to_content(endpoint, api_key, settings, switch):
    if not settings.profile.reasoning_parser:
        pytest.skip(f"profile {settings.profile.name} has no reasoning parser")
    message = chat(endpoint, api_key, settings,
                   chat_template_kwargs={switch: False})["choices"][0]["message"]
    assert message["content"], message
    assert not message.get("reasoning"), message


def test_tool_calls_are_accepted_with_valid_json_arguments(endpoint, api_key, settings):
    if not settings.profile.enable_auto_tool_choice:
        pytest.skip(f"profile {settings.profile.name} does not enable tool choice")
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    message = chat(endpoint, api_key, settings, tools=tools, tool_choice="auto",
                   messages=[{"role": "user", "content": "Weather in Beijing?"}]
                   )["choices"][0]["message"]
    for call in message.get("tool_calls") or []:
        json.loads(call["function"]["arguments"])


def png_data_url(size: int = 16) -> str:
    """A small solid PNG made here: the check must not reach the internet for an image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + b"\xd0\x40\x20" * size for _ in range(size))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_image_input_is_accepted_by_multimodal_profiles(endpoint, api_key, settings):
    if not settings.profile.multimodal:
        pytest.skip(f"profile {settings.profile.name} is text-only")
    content = [{"type": "text", "text": "Describe this image."},
               {"type": "image_url", "image_url": {"url": png_data_url()}}]
    answer = chat(endpoint, api_key, settings, messages=[{"role": "user", "content": content}])
    assert answer["usage"]["prompt_tokens"] > 0


def test_metrics_are_served(endpoint, api_key):
    status, text = request(endpoint, "/metrics", api_key)
    assert status == 200
    assert "vllm:" in text


def test_a_request_without_the_api_key_is_refused(endpoint, api_key):
    if not api_key:
        pytest.skip("no API key configured (vllm_api_key_file): the endpoint is open")
    assert request(endpoint, "/v1/models", None)[0] == 401
