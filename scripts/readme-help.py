#!/usr/bin/env python3
"""Refreshes the `--help` transcripts in README.md from the built binaries.

Usage: cargo build && scripts/readme-help.py [--check]

Every line `$ silverguard ...` or `$ bracelet-sim ...` inside a fenced block is run (from
target/debug, with an empty environment so no env value leaks into the text) and the lines
after it, up to the next `$ ` line or the end of the block, are replaced by its output.
--check exits 1 when the README is out of date instead of writing it.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BINARIES = {"silverguard", "bracelet-sim"}


def run(command: str) -> list[str]:
    argv = command.split()
    argv[0] = os.path.join(ROOT, "target", "debug", argv[0])
    if not os.path.exists(argv[0]):
        sys.exit(f"{argv[0]} is not built: run `cargo build --workspace` first")
    out = subprocess.run(argv, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    return out.stdout.rstrip("\n").split("\n")


def refresh(lines: list[str]) -> list[str]:
    result, i, in_block = [], 0, False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_block = not in_block
            result.append(line)
            i += 1
            continue
        if in_block and line.startswith("$ ") and line[2:].split()[0] in BINARIES:
            result.append(line)
            result.extend(run(line[2:]))
            i += 1
            while i < len(lines) and not lines[i].startswith("$ ") and not lines[i].startswith("```"):
                i += 1
            # Keep one blank line between two transcripts in one block.
            if i < len(lines) and lines[i].startswith("$ "):
                result.append("")
            continue
        result.append(line)
        i += 1
    return result


def main() -> int:
    with open(README, encoding="utf-8") as f:
        old = f.read().split("\n")
    new = refresh(old)
    if "--check" in sys.argv:
        if new != old:
            print("README.md's --help transcripts are out of date: run scripts/readme-help.py", file=sys.stderr)
            return 1
        return 0
    with open(README, "w", encoding="utf-8") as f:
        f.write("\n".join(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
