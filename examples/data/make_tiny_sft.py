#!/usr/bin/env python3
"""Writes tiny-sft.jsonl: a small chat SFT set in ms-swift's messages format.

The rows are short templated Q/A (arithmetic, capitals, echo, upper-casing, a
two-turn "remember my name") so that a byte-level model of a few hundred
thousand parameters visibly learns them in a few dozen steps. Deterministic:
rerunning it rewrites the same file.

    python3 examples/data/make_tiny_sft.py [OUT]
"""
import json
import random
import sys
from pathlib import Path

ROWS = 160
SEED = 1234

SYSTEMS = [None, None, "You are a helpful assistant.", "You are a concise assistant."]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Canada": "Ottawa", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Norway": "Oslo",
    "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna",
}
WORDS = ["apple", "river", "green", "cloud", "stone", "music", "tiger", "light",
         "paper", "ocean", "bread", "honey"]
NAMES = ["Ada", "Alan", "Grace", "Linus", "Barbara", "Ken", "Edsger", "Margaret"]


def arithmetic(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return [("user", f"What is {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}.")]


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    return [("user", f"What is the capital of {country}?"),
            ("assistant", f"The capital of {country} is {CAPITALS[country]}.")]


def echo(rng):
    phrase = " ".join(rng.sample(WORDS, 3))
    return [("user", f"Repeat after me: {phrase}"), ("assistant", phrase)]


def upper(rng):
    word = rng.choice(WORDS)
    return [("user", f"Say {word} in capital letters."), ("assistant", word.upper())]


def remember_name(rng):
    # Two assistant turns: both are trained on, the user turns are not.
    name = rng.choice(NAMES)
    return [("user", f"Hi, my name is {name}."), ("assistant", f"Nice to meet you, {name}!"),
            ("user", "What is my name?"), ("assistant", f"Your name is {name}.")]


KINDS = [arithmetic, capital, capital, echo, upper, remember_name]


def rows(n, seed):
    rng = random.Random(seed)
    for _ in range(n):
        turns = rng.choice(KINDS)(rng)
        system = rng.choice(SYSTEMS)
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": role, "content": text} for role, text in turns]
        yield {"messages": messages}


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("tiny-sft.jsonl")
    with out.open("w", encoding="utf-8") as f:
        for row in rows(ROWS, SEED):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {ROWS} rows to {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
