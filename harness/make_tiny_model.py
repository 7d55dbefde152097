"""Build, offline and in seconds, the tiny random-weight model the sandbox serves.

    make-tiny-model [--out .cache/tiny-model] [--shards 2]

A Llama-style causal LM (hidden 128, 2 layers, random bf16 weights from a fixed seed) with a
byte-level BPE tokenizer of 2048 tokens trained here, and a Kimi-style chat template that
knows the tokens vLLM's `kimi_k2` reasoning and tool-call parsers look up (<think>, </think>,
<|tool_calls_section_begin|>, ...). Its answers are noise, but every layer of the serving path
(tokenizer, chat template, parsers, sampling, the OpenAI API) runs for real.

Needs only the `tokenizers` package: weights are written in the safetensors format directly.
The output is deterministic: the same files byte for byte on every run, so a deploy that
pushes them is a no-op the second time.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
from pathlib import Path

from tools.repository import REPO, missing_packages

VOCAB_SIZE = 2048
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 4096
SEED = 20260420  # Kimi-K2.6's release date, for want of a better number

EOS = "<|im_end|>"
SPECIAL_TOKENS = [
    "[BOS]", "[PAD]", EOS, "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
    "<think>", "</think>", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>",
    "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|media_pad|>",
]

# The shape of Kimi-K2's template, reduced: role markers, tool declarations, tool calls in
# assistant turns, and the thinking switch (`thinking`, or the `enable_thinking` spelling).
CHAT_TEMPLATE = """\
{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}<|im_user|>user<|im_middle|>
{%- elif message.role == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>
{%- else -%}<|im_system|>{{ message.role }}<|im_middle|>{%- endif -%}
{%- if message.content is string -%}{{ message.content }}
{%- elif message.content -%}{%- for part in message.content -%}
{%- if part.type == 'text' -%}{{ part.text }}{%- else -%}<|media_pad|>{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- if message.tool_calls -%}<|tool_calls_section_begin|>
{%- for call in message.tool_calls -%}<|tool_call_begin|>functions.{{ call.function.name }}:{{ loop.index0 }}\
<|tool_call_argument_begin|>{{ call.function.arguments }}<|tool_call_end|>{%- endfor -%}
<|tool_calls_section_end|>{%- endif -%}
<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>
{%- set think = thinking if thinking is defined else (enable_thinking if enable_thinking is defined else true) -%}
{%- if think -%}<think>{%- else -%}<think></think>{%- endif -%}
{%- endif -%}"""

CORPUS = [
    "Kimi-K2.6 is served by vLLM on GB200 hosts with four Blackwell GPUs each.",
    "The deploy installs the Hugging Face CLI, fetches the weights and starts the service.",
    "Summarize the document in one sentence. You are a helpful assistant.",
    "Tool calls carry a function name and JSON arguments such as {\"city\": \"Beijing\"}.",
    "GPU memory, tensor parallel size, KV cache and throughput in tokens per second.",
    "0123456789 !?.,;:'\"()[]{}<>/\\|-_=+*&^%$#@~` abcdefghijklmnopqrstuvwxyz",
    "你好，请介绍一下你自己。思考模式可以开启或关闭。",
]


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1)
    rng = random.Random(SEED)
    # Pseudo-words from random syllables give BPE enough distinct pairs to fill the vocabulary.
    syllables = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]
    words = " ".join(CORPUS).split() + [
        "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)]
    lines = CORPUS * 20 + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def bf16_bytes(values: list[float]) -> bytes:
    """float -> bfloat16 by rounding the float32 bit pattern to its top 16 bits."""
    packed = struct.pack(f"<{len(values)}f", *values)
    words = struct.unpack(f"<{len(values)}I", packed)
    return struct.pack(f"<{len(values)}H", *(((w + 0x7FFF + ((w >> 16) & 1)) >> 16) & 0xFFFF
                                            for w in words))


def tensors(rng: random.Random) -> dict[str, tuple[list[int], bytes]]:
    head_dim = HIDDEN // HEADS

    def normal(*shape: int) -> tuple[list[int], bytes]:
        count = 1
        for dim in shape:
            count *= dim
        return list(shape), bf16_bytes([rng.gauss(0.0, 0.02) for _ in range(count)])

    def ones(size: int) -> tuple[list[int], bytes]:
        return [size], bf16_bytes([1.0] * size)

    out = {"model.embed_tokens.weight": normal(VOCAB_SIZE, HIDDEN)}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        out[f"{prefix}.self_attn.q_proj.weight"] = normal(HEADS * head_dim, HIDDEN)
        out[f"{prefix}.self_attn.k_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN)
        out[f"{prefix}.self_attn.v_proj.weight"] = normal(KV_HEADS * head_dim, HIDDEN)
        out[f"{prefix}.self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * head_dim)
        out[f"{prefix}.mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        out[f"{prefix}.mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        out[f"{prefix}.mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        out[f"{prefix}.input_layernorm.weight"] = ones(HIDDEN)
        out[f"{prefix}.post_attention_layernorm.weight"] = ones(HIDDEN)
    out["model.norm.weight"] = ones(HIDDEN)
    out["lm_head.weight"] = normal(VOCAB_SIZE, HIDDEN)
    return out


def write_safetensors(path: Path, items: dict[str, tuple[list[int], bytes]]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, data) in items.items():
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for _, data in items.values():
            handle.write(data)


def build(out: Path, shards: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB_SIZE, "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": ids["[BOS]"], "eos_token_id": ids[EOS], "pad_token_id": ids["[PAD]"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["[BOS]"], "eos_token_id": ids[EOS], "pad_token_id": ids["[PAD]"]},
        indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "[BOS]", "eos_token": EOS,
        "pad_token": "[PAD]", "model_max_length": MAX_POSITIONS, "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    weights = tensors(random.Random(SEED))
    names = list(weights)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for index in range(shards):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {name: weights[name] for name in names[index * per_shard:(index + 1) * per_shard]}
        write_safetensors(out / filename, chunk)
        weight_map.update({name: filename for name in chunk})
    total = sum(len(data) for _, data in weights.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"tiny model: {len(list(out.iterdir()))} files, {size / 1e6:.1f} MB in {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "tiny-model")
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args(argv)
    missing = missing_packages("make-tiny-model", "tokenizers")
    if missing:
        sys.exit(missing)
    build(args.out, args.shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
