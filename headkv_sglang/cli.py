"""The ``headkv-sglang`` command: ``headkv-sglang profile ...`` profiles a model's heads.

Serving itself needs no command of ours: the plugin adds ``--kv-policy`` and the other
flags to ``python -m sglang.launch_server``.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "profile": "measure a model's head importance and write a profile for --kv-head-profile "
               "(python -m headkv_sglang.profile)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: headkv-sglang COMMAND [ARGS]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:9s} {text}")
        print("\n`headkv-sglang COMMAND --help` for a command's arguments")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "profile":
        from headkv_sglang.profile import main as profile_main

        return profile_main(rest, prog="headkv-sglang profile")
    print(f"headkv-sglang: unknown command {cmd!r}; choose one of {list(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
