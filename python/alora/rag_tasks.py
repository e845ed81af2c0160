"""The two RAG intrinsics shipped with `alora` and the synthetic data they are trained on.

Each example is a short passage about a fictional person (so the model cannot answer from
world knowledge), a question about one attribute, and an assistant answer. Two yes/no
intrinsics judge the last turn of such a conversation:

- `answerability`: does the passage contain what the question asks?
- `support`: does the passage support the assistant's answer?

Labels are known by construction. The same generator feeds the training script
(`examples/train_intrinsics.py`), its held-out evaluation and `alora demo`'s conversation.
The intrinsic is invoked by appending `invocation_text(task)` (a user turn with the
question plus the assistant header) to the conversation; it answers `yes` or `no`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS: tuple[str, ...] = ("answerability", "support")
SYSTEM_PROMPT = "Answer the question from the passage in one short sentence."
INSTRUCTIONS: dict[str, str] = {
    "answerability": "Does the passage answer the last question? yes or no",
    "support": "Does the passage support the last answer? yes or no",
}
# Where the trained adapters ship: inside the package, so `pip install .` carries them.
ADAPTER_DIR = Path(__file__).parent / "intrinsics"


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST = _words(
    "Lena Mira Tomas Ines Oskar Priya Yuki Dario Alma Bram Celia Emil Farah Goran Hedda Ivo "
    "Jana Kofi Lior Maren Nils Odile Pavel Rosa Sven Talia Ugo Vera Wim Zora"
)
_LAST = _words(
    "Ostrova Keller Varga Lindqvist Amari Brennan Castell Dufresne Erikson Falk Grant Halden "
    "Ibarra Jovic Kaur Lamberti Moreau Novak Okafor Petrov Quist Rahman Sato Tamm Ueda Voss"
)
_CITIES = _words(
    "Norhaven Belmora Quillton Ashgrove Duneport Veloria Harrowby Kestrel Marwick Solenne "
    "Tarnby Oakvale Pellham Rivenford Sundale Wexmoor"
)

# attribute (as the passage and the question name it) -> its values. Passage, question and
# answer name the attribute with the same words: the intrinsics learn to match the question
# or answer to a passage sentence, which a 135M model can learn in CPU minutes.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "year of birth": tuple(str(y) for y in range(1931, 1999, 3)),
    "home city": _CITIES,
    "job": _words(
        "baker nurse pilot carpenter chemist librarian plumber teacher architect "
        "journalist dentist farmer"
    ),
    "sport": _words("tennis chess volleyball hockey cricket rugby badminton golf handball"),
    "home language": _words(
        "Portuguese Finnish Greek Korean Swahili Dutch Polish Turkish Hindi Czech"
    ),
    "pet": _words("cat dog parrot rabbit turtle hamster goat ferret goldfish"),
    "favourite colour": _words("green purple orange yellow blue red teal brown grey"),
}
_ANSWERS = ("{n}'s {a} is {v}.", "{n}'s {a} is {v}.", "It is {v}.", "The {a} is {v}.")


@dataclass(frozen=True)
class Turn:
    """One RAG turn: the user's passage and question, an assistant answer, true labels."""

    passage: str
    question: str
    answer: str
    answerable: bool
    supported: bool
    truth: str  # the passage's value of the asked attribute ("" when unanswerable)

    @property
    def user(self) -> str:
        return f"Passage: {self.passage}\nQuestion: {self.question}"

    def label(self, task: str) -> bool:
        return {"answerability": self.answerable, "support": self.supported}[task]


def make_turn(rng: random.Random, *, answerable: bool, answer: str = "correct") -> Turn:
    """A passage of three facts and a question that it answers (or not, about a fourth
    attribute). `answer`: "correct" (the passage's value), "wrong" (another value of the
    asked attribute; for an unanswerable question every value is unsupported)."""
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    attrs = rng.sample(sorted(ATTRIBUTES), 4)
    facts = {a: rng.choice(ATTRIBUTES[a]) for a in attrs}
    shown = attrs[:3]
    asked = rng.choice(shown) if answerable else attrs[3]
    passage = " ".join(f"{name}'s {a} is {facts[a]}." for a in shown)
    if answerable and answer == "correct":
        value = facts[asked]
    else:
        value = rng.choice([v for v in ATTRIBUTES[asked] if not (answerable and v == facts[asked])])
    return Turn(
        passage=passage,
        question=f"What is {name}'s {asked}?",
        answer=rng.choice(_ANSWERS).format(n=name, a=asked, v=value),
        answerable=answerable,
        supported=answerable and value == facts[asked],
        truth=facts[asked] if answerable else "",
    )


def make_example(rng: random.Random, task: str) -> Turn:
    """A turn with a balanced label for `task`; the other label varies too, so neither
    task can be solved by the other's cue."""
    if task == "answerability":
        answerable = rng.random() < 0.5
        return make_turn(rng, answerable=answerable, answer=rng.choice(("correct", "wrong")))
    if rng.random() < 0.5:
        return make_turn(rng, answerable=True, answer="correct")
    return make_turn(rng, answerable=rng.random() < 0.5, answer="wrong")


def messages(turns: list[Turn], *, last_answer: str | None = None) -> list[dict[str, str]]:
    """The chat of `turns` (system prompt first); `last_answer` replaces the last turn's
    answer (e.g. by what the base model said)."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i, t in enumerate(turns):
        answer = last_answer if (last_answer is not None and i == len(turns) - 1) else t.answer
        msgs += [{"role": "user", "content": t.user}, {"role": "assistant", "content": answer}]
    return msgs


def invocation_text(tokenizer: Any, task: str) -> str:
    """What an intrinsic call appends to the conversation: a user turn with the task's
    instruction and the assistant header, rendered by the model's own chat template."""
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": INSTRUCTIONS[task]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    # SmolLM2's template prepends its default system prompt when there is none; the
    # invocation is the user turn alone.
    start = full.index(INSTRUCTIONS[task])
    head = full.rfind("<|im_start|>", 0, start)
    return full[head:] if head >= 0 else full


def label_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(yes, no) token ids: the first token an intrinsic generates."""
    yes = tokenizer("yes", add_special_tokens=False)["input_ids"]
    no = tokenizer("no", add_special_tokens=False)["input_ids"]
    assert len(yes) == 1 and len(no) == 1, "yes/no must be single tokens"
    return yes[0], no[0]


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered chat string, never adding a BOS the template did not."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
