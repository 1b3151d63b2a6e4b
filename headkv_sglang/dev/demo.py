"""The README's run command: serve the test model with head-level KV compression, ask it, stop it.

    python -m headkv_sglang.dev.demo [--model-path DIR] [--plain] [-- extra launch_server flags]

Starts ``python -m sglang.launch_server --model-path M --kv-policy headkv --kv-budget 128``,
asks a short question and a ~2k-token needle-in-a-haystack question, prints the answers
and what the server reports about the compressed KV, then stops the server.
"""

from __future__ import annotations

import argparse
import sys
import time

from headkv_sglang.dev.server import ServerError, SGLangServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headkv_sglang.dev.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", help="model directory (default: the test model, fetched if needed)")
    p.add_argument("--plain", action="store_true", help="serve without --kv-policy (plain SGLang)")
    p.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="extra flags for sglang.launch_server (after --)")
    args = p.parse_args(argv)
    extra = [a for a in args.server_args if a != "--"]
    if not args.plain and "--kv-policy" not in extra:
        extra = ["--kv-policy", "headkv", "--kv-budget", "128", *extra]

    if args.model_path is None:
        from headkv_sglang.dev import models

        args.model_path = str(models.fetch())

    from openai import OpenAI

    from headkv_sglang.dev.haystack import needle_prompt

    server = SGLangServer(args.model_path, extra, log_path=args.log)
    print(f"$ {' '.join(server.command())}", flush=True)
    t0 = time.time()
    try:
        server.start()
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(f"server ready in {time.time() - t0:.0f} s at {server.url} (log: {server.log_path})", flush=True)
        client = OpenAI(base_url=server.openai_base_url, api_key="none")
        question = "What is the capital of France?"
        r = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0
        )
        print(f"Q: {question}\nA: {r.choices[0].message.content}")
        needle = needle_prompt(1500, depth=0.4, seed=1)
        t1 = time.time()
        r = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": needle.prompt}], max_tokens=16, temperature=0
        )
        answer = r.choices[0].message.content
        print(
            f"Needle in a {r.usage.prompt_tokens}-token haystack: expected {needle.answer}, "
            f"got {answer!r} ({'correct' if needle.answer in answer else 'WRONG'}; {time.time() - t1:.1f} s)"
        )
        state = server.plugin_state()
        for name, pol in (state.get("policies") or {}).items():
            if pol.get("cumulative_kept_fraction") is not None:
                print(
                    f"KV compression [{name}]: {pol['compressed_requests_total']} prompts compressed, "
                    f"{100 * pol['cumulative_kept_fraction']:.1f}% of prompt KV kept "
                    f"({pol['cumulative_ratio']:.1f}x less memory, page rounding included)"
                )
    finally:
        server.stop()
        print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
