"""The README's run command: start a real SGLang server on the test model, ask it, stop it.

    python -m headkv_sglang.demo [--model-path DIR] [-- extra launch_server flags]
"""

from __future__ import annotations

import argparse
import sys
import time

from headkv_sglang.server import ServerError, SGLangServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m headkv_sglang.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", help="model directory (default: the test model, fetched if needed)")
    p.add_argument("--log", default=None, help="server log file (default: a temporary file)")
    p.add_argument("server_args", nargs=argparse.REMAINDER, help="extra flags for sglang.launch_server (after --)")
    args = p.parse_args(argv)
    extra = [a for a in args.server_args if a != "--"]

    if args.model_path is None:
        from headkv_sglang import models

        args.model_path = str(models.fetch())

    from openai import OpenAI

    from headkv_sglang.haystack import needle_prompt

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
    finally:
        server.stop()
        print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
