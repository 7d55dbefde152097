"""The model catalog and the one renderer of the `vllm serve` argument list.

Every runtime (venv unit, container unit, Kubernetes Deployment) takes its command line from
`vllm_serve_args`, so a flag can never differ between runtimes. Hosts pick a profile with
`model_profile` and override single values through the `vllm_*` data keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

GB = 10**9


@dataclass(frozen=True)
class ModelProfile:
    """What a model needs to be fetched, placed and served."""

    name: str  # catalog key, the value of `model_profile`
    repo: str  # Hub repository
    revision: str  # pinned revision; data key `model_revision` overrides it
    served_name: str  # the `model` name clients send
    local_name: str  # directory under `weights_dir`
    size_bytes: int  # weights on disk: free-space preflight, health and probe timeouts
    min_gpu_memory_gb: int  # all GPUs together, from the vLLM recipe
    tensor_parallel_size: int
    attention_heads: int  # tensor parallel size must divide it (vLLM shards heads evenly)
    gpu_memory_utilization: float | None  # None: vLLM's default (and CPU builds ignore it)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_auto_tool_choice: bool = False
    trust_remote_code: bool = False
    multimodal: bool = False
    # Speculative decoding: the EAGLE-3 draft offered for this model (on only by data key).
    draft_local_name: str | None = None
    num_speculative_tokens: int = 3
    # Flags that sit between the memory flag and the draft flag, as in the seed's command.
    extra_args: tuple[str, ...] = ()
    # Environment the server needs for this model (non-secret).
    environment: dict[str, str] = field(default_factory=dict)


PROFILES: dict[str, ModelProfile] = {
    profile.name: profile
    for profile in (
        # The seed (section 4.1): INT4, ~595 GB; vLLM's recipe asks for >= 714 GB of GPU memory.
        # 4 x GB200 (189 GB) at 0.90 utilisation is ~680 GB: the seed ran it anyway with a
        # tight KV cache. The NVFP4 profile below fits a tray with room to spare.
        ModelProfile(
            name="kimi-k2.6",
            repo="moonshotai/Kimi-K2.6",
            revision="main",
            served_name="Kimi-K2.6",
            local_name="kimi-k2.6",
            size_bytes=595 * GB,
            min_gpu_memory_gb=714,
            tensor_parallel_size=4,
            attention_heads=64,
            gpu_memory_utilization=0.90,
            tool_call_parser="kimi_k2",
            reasoning_parser="kimi_k2",
            enable_auto_tool_choice=True,
            trust_remote_code=True,
            multimodal=True,
            draft_local_name="kimi-k2.6-eagle3",
            num_speculative_tokens=3,
            extra_args=("--attention-config.use_trtllm_ragged_deepseek_prefill=True",),
        ),
        # vLLM recipe's Blackwell variant (GB200/B200): ~600 GB minimum, FP8 KV cache.
        ModelProfile(
            name="kimi-k2.6-nvfp4",
            repo="nvidia/Kimi-K2.6-NVFP4",
            revision="main",
            served_name="Kimi-K2.6",
            local_name="kimi-k2.6-nvfp4",
            size_bytes=600 * GB,
            min_gpu_memory_gb=600,
            tensor_parallel_size=4,
            attention_heads=64,
            gpu_memory_utilization=0.90,
            tool_call_parser="kimi_k2",
            reasoning_parser="kimi_k2",
            enable_auto_tool_choice=True,
            trust_remote_code=True,
            multimodal=True,
            draft_local_name="kimi-k2.6-eagle3",
            num_speculative_tokens=3,
            extra_args=("--kv-cache-dtype", "fp8"),
        ),
        # The sandbox: the tiny random-weight model from make-tiny-model, served by the
        # CPU build of vLLM under the production served name, with the same parsers.
        ModelProfile(
            name="sandbox-tiny",
            repo="sandbox/tiny-kimi",
            revision="main",
            served_name="Kimi-K2.6",
            local_name="tiny-kimi",
            size_bytes=2 * 10**6,
            min_gpu_memory_gb=0,
            tensor_parallel_size=1,
            attention_heads=4,
            gpu_memory_utilization=None,
            tool_call_parser="kimi_k2",
            reasoning_parser="kimi_k2",
            enable_auto_tool_choice=True,
            # Eager mode: compiling the graph costs ~30 s of start-up on 2 cores and buys nothing.
            extra_args=("--enforce-eager", "--max-model-len", "2048"),
            environment={"VLLM_CPU_KVCACHE_SPACE": "1"},
        ),
    )
}


def vllm_serve_args(
    profile: ModelProfile,
    *,
    model_path: str,
    draft_path: str | None,
    host: str,
    port: int,
    tensor_parallel_size: int | None = None,
    gpu_memory_utilization: float | None = None,
    num_speculative_tokens: int | None = None,
    shutdown_timeout_s: int | None = None,
    tls_flags: list[str] | tuple[str, ...] = (),
    extra_args: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The `vllm serve` argument list (without the `vllm` executable), in the seed's order.

    + model_path: where the runtime sees the weights (a host path, or /app/model in a container)
    + draft_path: where it sees the EAGLE-3 draft; None turns speculative decoding off
    + host, port: the listening address
    + tensor_parallel_size, gpu_memory_utilization, num_speculative_tokens: None takes the
      profile's value
    + shutdown_timeout_s: seconds in-flight requests get to finish on SIGTERM
      (`--shutdown-timeout`); None leaves vLLM's default (abort at once), as the seed does
    + tls_flags: `--ssl-certfile`/`--ssl-keyfile` where the runtime sees the files
      (tasks.tls.serve_flags); empty: plain HTTP
    + extra_args: appended verbatim (data key `vllm_extra_args`)
    """
    tp = tensor_parallel_size if tensor_parallel_size is not None else profile.tensor_parallel_size
    memory = (gpu_memory_utilization if gpu_memory_utilization is not None
              else profile.gpu_memory_utilization)
    args = ["serve", model_path, "--tensor-parallel-size", str(tp)]
    if profile.tool_call_parser:
        args += ["--tool-call-parser", profile.tool_call_parser]
    if profile.reasoning_parser:
        args += ["--reasoning-parser", profile.reasoning_parser]
    if profile.enable_auto_tool_choice:
        args.append("--enable-auto-tool-choice")
    args += ["--served-model-name", profile.served_name]
    if profile.trust_remote_code:
        args.append("--trust-remote-code")
    if memory is not None:
        args += ["--gpu-memory-utilization", f"{memory:.2f}"]
    args += list(profile.extra_args)
    if draft_path is not None:
        tokens = (num_speculative_tokens if num_speculative_tokens is not None
                  else profile.num_speculative_tokens)
        speculative = {"model": draft_path, "method": "eagle3", "num_speculative_tokens": tokens}
        args += ["--speculative-config", json.dumps(speculative, separators=(",", ":"))]
    args += ["--host", host, "--port", str(port)]
    if shutdown_timeout_s is not None:
        args += ["--shutdown-timeout", str(shutdown_timeout_s)]
    return args + list(tls_flags) + list(extra_args)


def systemd_exec_line(argv: list[str]) -> str:
    """Quote an argv for a systemd ExecStart= line, with `%` and `$` doubled so systemd takes
    them literally (no specifier or variable expansion). Arguments with a quote or backslash
    get double quotes with those escaped, which systemd and a POSIX shell read alike."""
    quoted = []
    for arg in argv:
        if arg and all(c.isalnum() or c in "-_./:=,+@" for c in arg):
            quoted.append(arg)
        elif "'" not in arg and "\\" not in arg:
            quoted.append(f"'{arg}'")
        else:
            quoted.append('"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return " ".join(quoted).replace("%", "%%").replace("$", "$$")
