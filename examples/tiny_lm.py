"""A tiny character-level language model in numpy, for examples/openai_server.py.

A bigram model: how often each character follows another, counted from a text this file
ships (no downloads), each line of it one "document" that ends with an end-of-text token.
It generates one character (its token) at a time, deterministic given a seed. The variants
in ``CATALOG`` are the "models" the OpenAI endpoint serves: trained on different texts,
or the same text with another default temperature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

BARD = """\
To be, or not to be, that is the question.
All the world's a stage, and all the men and women merely players.
The course of true love never did run smooth.
Now is the winter of our discontent made glorious summer by this sun of York.
Shall I compare thee to a summer's day? Thou art more lovely and more temperate.
If music be the food of love, play on.
We are such stuff as dreams are made on, and our little life is rounded with a sleep.
Some are born great, some achieve greatness, and some have greatness thrust upon them.
The quality of mercy is not strained; it droppeth as the gentle rain from heaven.
Cowards die many times before their deaths; the valiant never taste of death but once.
What's in a name? That which we call a rose by any other name would smell as sweet.
Love all, trust a few, do wrong to none.
"""

CHEF = """\
Whisk the eggs with a pinch of salt until the yolks and whites are one.
Melt the butter in a warm pan and let it foam before the eggs go in.
Stir slowly over a low flame, and take the pan off the heat while the eggs are still soft.
Toast the bread, rub it with garlic, and pour a little olive oil over it.
Simmer the tomatoes with onion and basil for twenty minutes, then season to taste.
Boil the pasta in plenty of salted water and keep a cup of the water for the sauce.
Fold the flour into the batter gently, so the cake stays light.
Roast the potatoes until their edges are brown and crisp.
Let the dough rest for an hour under a damp cloth before you shape it.
Serve the soup hot, with bread on the side and a spoon of cream on top.
"""

END = "\x03"  # end of text: the last token of every line, where a generation stops


class CharModel:
    """Bigram counts of a text: the next character's distribution given the last one.

    Args:
        text: the training text; each line is a document.
        temperature: the default sampling temperature (a request's own overrides it).
    """

    def __init__(self, text: str, temperature: float = 1.0) -> None:
        documents = [line for line in text.splitlines() if line.strip()]
        self.vocab = sorted(set("".join(documents)) | {END})
        self.index = {char: i for i, char in enumerate(self.vocab)}
        self.end = self.index[END]
        counts = np.zeros((len(self.vocab), len(self.vocab)))
        for document in documents:
            ids = [self.end, *(self.index[char] for char in document), self.end]
            np.add.at(counts, (ids[:-1], ids[1:]), 1)  # END starts a document too
        self.counts = counts + 0.01  # every character may follow every other, rarely
        self.temperature = temperature

    def generate(self, prompt: str, max_tokens: int, temperature: Optional[float] = None,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 ignore_eos: bool = False) -> Iterator[str]:
        """Characters that continue ``prompt`` (from its last character; from the start of
        a document when it has none or one the text never had), up to ``max_tokens`` or the
        end-of-text token. ``temperature`` 0 picks the likeliest each time; ``top_p`` keeps
        the likeliest characters that make up that much of the probability; the same
        ``seed`` gives the same characters."""
        temperature = self.temperature if temperature is None else temperature
        rng = np.random.default_rng(seed)
        last = self.index.get(prompt[-1:], self.end)
        for _ in range(max_tokens):
            probs = self._next(last, temperature, top_p, allow_end=not ignore_eos)
            last = int(probs.argmax()) if temperature == 0 else \
                int(rng.choice(len(probs), p=probs))
            if last == self.end:
                return
            yield self.vocab[last]

    def _next(self, last: int, temperature: float, top_p: float,
              allow_end: bool) -> np.ndarray:
        logits = np.log(self.counts[last]) / max(temperature, 1e-6)
        if not allow_end:
            logits[self.end] = -np.inf
        probs = np.exp(logits - logits.max())
        if top_p < 1:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order]) / probs.sum()
            probs[order[int(np.searchsorted(cumulative, top_p)) + 1:]] = 0
        return probs / probs.sum()


@dataclass(frozen=True)
class ModelCard:
    """One servable variant: its training text and default temperature."""

    text: str
    temperature: float = 1.0

    def load(self) -> CharModel:
        return CharModel(self.text, self.temperature)


CATALOG = {
    "tiny-bard": ModelCard(BARD),
    "tiny-bard-cold": ModelCard(BARD, temperature=0.3),
    "tiny-chef": ModelCard(CHEF),
}
