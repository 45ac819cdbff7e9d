"""What a scorer is asked and how its answer is read: one prompt per batch of numbered excerpts,
answered with a JSON list of excerpt numbers (read leniently: the last [...] in the reply). The
scorer's reply is started with "[" where the backend can (a small model then writes numbers, not
prose) and stopped at the list's "]", so it writes no more than the list."""

from __future__ import annotations

import re
from collections.abc import Sequence

from app.pipeline.autointerp.backends import ChatMessage

DETECTION_SYSTEM = (
    "You are checking an explanation of one feature of a language model: a direction that is "
    "active on some tokens of some texts. You get the explanation and numbered text excerpts. "
    "Say which excerpts the feature is active on, according to the explanation. Answer with only "
    "a JSON list of excerpt numbers, e.g. [1, 4]; answer [] if it is active on none."
)
FUZZING_SYSTEM = (
    "You are checking an explanation of one feature of a language model: a direction that is "
    "active on some tokens of some texts. Every excerpt below contains tokens where the feature "
    "is active, and some tokens are marked <<like this>>. In some excerpts the marks are on the "
    "tokens where the feature is strongest (at least {percent}% of its strongest value in that "
    "excerpt); in the others the same number of marks is on other tokens. Using the "
    "explanation, say which excerpts are marked correctly. Answer with only a JSON list of "
    "excerpt numbers, e.g. [2, 3]; answer [] if none is."
)


def _numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"{i}. {text}" for i, text in enumerate(texts, start=1))


def detection_messages(explanation: str, texts: Sequence[str]) -> list[ChatMessage]:
    return [
        {"role": "system", "content": DETECTION_SYSTEM},
        {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpts:\n"
                                    f"{_numbered(texts)}\n\nActive on (JSON list):"},
    ]


def fuzzing_messages(explanation: str, texts: Sequence[str], fraction: float
                     ) -> list[ChatMessage]:
    return [
        {"role": "system", "content": FUZZING_SYSTEM.format(percent=round(fraction * 100))},
        {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpts:\n"
                                    f"{_numbered(texts)}\n\nCorrectly marked (JSON list):"},
    ]


LIST_START, LIST_END = "[", "]"  # the scorer's reply starts and stops with its list
_LIST = re.compile(r"\[([^\[\]]*)\]")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_ITEM = re.compile(r"""^\s*["']?\s*(\d+)\s*["']?\s*$""")
_NONE = {"none", "no", "[]", "none.", "nothing"}


def parse_numbers(answer: str, n: int) -> tuple[set[int], int] | None:
    """The excerpt numbers (1..n) an answer names and how many it named out of range; None when
    the answer holds no readable list (a list with anything but numbers in it is not readable).

    Accepted: the last JSON-like list in the reply ("[1, 3]", "Answer: [2]", '["1"]', a code
    fence around it, reasoning before it in <think> tags), or a bare "none". A list left open
    at the end ("[1, 3") is read as closed: a reply stopped at LIST_END does not include it.
    """
    text = _THINK.sub("", answer or "").strip()
    if text.rfind("[") > text.rfind(LIST_END):
        text += LIST_END
    lists = _LIST.findall(text)
    if not lists:
        return (set(), 0) if text.strip("`. \n").lower() in _NONE else None
    body = lists[-1].strip()
    if not body:
        return set(), 0
    numbers: set[int] = set()
    out_of_range = 0
    for item in body.split(","):
        match = _ITEM.match(item)
        if match is None:
            return None
        k = int(match.group(1))
        if 1 <= k <= n:
            numbers.add(k)
        else:
            out_of_range += 1
    return numbers, out_of_range
