"""Example corpora that ship inside PyPI packages (nothing is fetched from a hub at run time).

    python -m data_pipeline.examples chitchat WHEEL OUT.jsonl [--max-pairs N]

chitchat-dataset (MIT): 7,168 real chats. Each chat is a list of turns (one speaker's consecutive
messages); consecutive turns become {"prompt", "response"} records for `data.format=chat`.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path


def chitchat_pairs(wheel: str | Path) -> Iterator[dict]:
    with zipfile.ZipFile(wheel) as z:
        chats = json.loads(z.read("chitchat_dataset/dataset.json"))
    for chat_id in sorted(chats):
        turns = [" ".join(m["text"].strip() for m in turn if m.get("text", "").strip())
                 for turn in chats[chat_id]["messages"]]
        turns = [t for t in turns if t]
        for prompt, response in zip(turns, turns[1:]):
            yield {"prompt": prompt, "response": response}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.examples")
    parser.add_argument("corpus", choices=["chitchat"])
    parser.add_argument("wheel", help="chitchat_dataset-0.9.0-py3-none-any.whl (pip download --no-deps)")
    parser.add_argument("out", help="JSONL to write")
    parser.add_argument("--max-pairs", type=int, default=0)
    args = parser.parse_args(argv)
    out, n = Path(args.out), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for pair in chitchat_pairs(args.wheel):
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
            n += 1
            if n == args.max_pairs:
                break
    tmp.replace(out)
    print(f"wrote {n:,} prompt/response pairs to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
