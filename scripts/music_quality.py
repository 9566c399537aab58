"""Quality of a folk model against its corpus, measured the same way for both.

For N tunes generated at temperature 1 and N tunes drawn from the corpus (seeded):
  * parse rate: share of tunes music21 reads from the ABC we write;
  * bar rate: share of inner bars (all but each tune's first and last; empty bars between two
    bar lines, such as ":| |:", left out) whose length equals the meter's bar length, read
    from the tokens by rnnkern.music.abc.interpret.

Usage: python scripts/music_quality.py [--model PATH] [--count N] [--seed S] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import random
import warnings
from pathlib import Path

from rnnkern.music import abc
from rnnkern.music.cli import DEFAULT_MODEL
from rnnkern.music.generate import sample_sequences
from rnnkern.music.train import load_checkpoint, model_from_checkpoint


def measure(token_lists: list[list[str]]) -> dict:
    import music21

    parsed, bars_ok, bars_total = 0, 0, 0
    failures: list[str] = []
    for i, tokens in enumerate(token_lists):
        text = abc.detokenize(tokens, number=i + 1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                music21.converter.parse(text, format="abc")
            parsed += 1
        except Exception as err:  # music21 raises many types; each failure is counted and kept
            failures.append(f"tune {i + 1}: {type(err).__name__}: {err}"[:200])
        meter = abc.body_tokens(tokens)[0] or "M:4/4"
        target = abc.meter_bar_length(meter)
        for length in abc.bar_durations(tokens)[1:-1]:
            if length == 0:
                continue
            bars_total += 1
            bars_ok += length == target
    return {
        "tunes": len(token_lists),
        "parse_rate": parsed / max(len(token_lists), 1),
        "inner_bars": bars_total,
        "bar_rate": bars_ok / max(bars_total, 1),
        "parse_failures": failures[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()

    state = load_checkpoint(args.model)
    model = model_from_checkpoint(state)
    seqs = sample_sequences(
        model, [abc.TOKEN_TO_ID["<s>"]], args.count, temperature=1.0, seed=args.seed,
        max_tokens=1000, end_id=abc.TOKEN_TO_ID["</s>"],
    )  # fmt: skip
    generated = [abc.decode(s) for s in seqs]
    finished = sum(t[-1] == "</s>" for t in generated)

    corpus = abc.load_corpus(state["train_config"].get("data", ["music21"]))
    sample = random.Random(args.seed).sample(corpus.tunes, min(args.count, len(corpus.tunes)))
    result = {
        "model": Path(args.model).name,
        "seed": args.seed,
        "model_tunes": measure(generated) | {"ended_with_end_token": finished},
        "corpus_tunes": measure([t.tokens for t in sample]),
    }
    for name in ("model_tunes", "corpus_tunes"):
        r = result[name]
        print(
            f"{name}: {r['tunes']} tunes, music21 parses {r['parse_rate']:.1%}, inner bars "
            f"of the meter's length {r['bar_rate']:.1%} of {r['inner_bars']}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
