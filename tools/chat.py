"""Send one chat completion to the vLLM endpoint of every sandbox host (and through each
sandbox router, `sandbox up N --routers R`), and print the answer.

    chat [--sandbox NAME] [--no-thinking] [PROMPT]
    chat --url http://HOST:8000 [--api-key-file FILE] [PROMPT]
    chat --url https://NAME:8000 --ca-file CA.pem [--api-key-file FILE] [PROMPT]

Prints the reasoning and the content the server returned (the sandbox's tiny model answers
with noise: what matters is that a real vLLM produced it). Exits 1 if any host fails.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tasks.data_keys import DEFAULTS
from tools.repository import REPO

ROUTER_PORT = DEFAULTS["router_port"]  # inventories/sandbox.py keeps the default


def chat(base_url: str, api_key: str | None, model: str, prompt: str, thinking: bool,
         context: ssl.SSLContext | None = None) -> dict:
    body = {"model": model, "max_tokens": 32, "temperature": 0.7,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": prompt}]}
    if not thinking:
        body["chat_template_kwargs"] = {"thinking": False}
    request = urllib.request.Request(f"{base_url}/v1/chat/completions",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=120, context=context) as response:
        return json.load(response)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="Summarize Kimi-K2.6 in one sentence.")
    parser.add_argument("--sandbox", default=os.environ.get("SANDBOX_NAME", "sbx"))
    parser.add_argument("--url", help="one endpoint instead of the sandbox's hosts")
    parser.add_argument("--api-key-file")
    parser.add_argument("--ca-file", help="with an https --url: the CA that signed the "
                        "server's certificate (vllm_tls_ca_file), else the system's")
    parser.add_argument("--model", default="Kimi-K2.6", help="served model name")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-thinking", action="store_true")
    args = parser.parse_args(argv)

    if args.url:
        targets = [(args.url, args.url.rstrip("/"))]
        key_file = args.api_key_file
    else:
        state_file = REPO / ".sandbox" / args.sandbox / "hosts.json"
        if not state_file.exists():
            print(f"chat: no sandbox '{args.sandbox}' ({state_file}); run `sandbox up`",
                  file=sys.stderr)
            return 1
        state = json.loads(state_file.read_text())
        targets = [(h["name"], f"http://{h['address']}:{args.port}")
                   if h.get("role", "serve") == "serve" else
                   (f"{h['name']} (router)", f"http://{h['address']}:{ROUTER_PORT}")
                   for h in state["hosts"]]
        key_file = args.api_key_file or state["api_key_file"]
    api_key = Path(key_file).read_text().strip() if key_file else None
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None

    failed = 0
    for name, url in targets:
        try:
            answer = chat(url, api_key, args.model, args.prompt, not args.no_thinking, context)
        except (urllib.error.URLError, OSError) as error:
            print(f"{name}: {url} failed: {error}", file=sys.stderr)
            failed += 1
            continue
        message = answer["choices"][0]["message"]
        usage = answer["usage"]
        print(f"{name} ({url}, {answer['model']}, {usage['completion_tokens']} tokens):")
        print(f"  reasoning: {message.get('reasoning')!r}")
        print(f"  content:   {message.get('content')!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
