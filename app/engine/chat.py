"""Chat completions on a loaded model: messages to prompt ids (the model's chat template, or a
plain role-prefixed transcript for models without one) and a step generator that decodes the
reply one forward per item, stopping at an end-of-turn token, a stop string or a token limit.

The generator feeds the model worker (the server's OpenAI-compatible route) and, run to its
end, the local autointerp backend: both sample through ``generate.Generation``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from app.engine.generate import Generation, IncrementalText
from app.errors import ConfigError

if TYPE_CHECKING:
    from app.engine.lm import LanguageModel

# Roles of a plain transcript, and the strings that end the assistant's turn in one: the model
# writing the next speaker's name.
TRANSCRIPT_NAMES = {"system": "System", "developer": "System", "user": "User",
                    "assistant": "Assistant"}
TRANSCRIPT_STOPS = ("\nUser:", "\nSystem:")
# Special tokens that end a turn in common chat formats, besides the model's own EOS ids.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>",
                      "<eos>")


class PromptTooLongError(ConfigError):
    """The messages are over the prompt token limit (OpenAI names it this way)."""

    param = "messages"
    code = "context_length_exceeded"


def transcript(messages: Iterable[Mapping[str, str]]) -> str:
    """Messages as a plain transcript ("User: ...", blank line between turns), ending with the
    prompt for the assistant's reply."""
    turns = [f"{TRANSCRIPT_NAMES.get(m['role'], m['role'].title())}: {m['content']}"
             for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def prompt_ids(lm: LanguageModel, messages: Sequence[Mapping[str, str]], *,
               max_tokens: int, limit_name: str = "") -> list[int]:
    """The token ids that ask the model for the next assistant turn: its chat template with the
    generation prompt, or (no template) BOS and the plain transcript. ConfigError when the
    template refuses the messages or the prompt is over ``max_tokens`` (``limit_name`` says
    where that limit comes from)."""
    if not messages:
        raise ConfigError("messages is empty; send at least one message")
    if lm.has_chat_template:
        try:
            text = lm.tokenizer.apply_chat_template(
                [{"role": "system" if m["role"] == "developer" else m["role"],
                  "content": m["content"]} for m in messages],
                add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises TemplateError (and others) for refused turns
            reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise ConfigError(f"{lm.model_id}'s chat template refused these messages: "
                              f"{reason}") from exc
        ids = lm.tokenize(str(text), prepend_bos=False)
    else:
        ids = lm.tokenize(transcript(messages), prepend_bos=True)
    if len(ids) > max_tokens:
        where = f" ({limit_name})" if limit_name else ""
        raise PromptTooLongError(f"the messages are {len(ids)} tokens; the limit is {max_tokens}"
                          f"{where}: shorten them")
    return ids


def stop_token_ids(lm: LanguageModel) -> frozenset[int]:
    """The model's EOS ids and the end-of-turn special tokens its vocabulary has."""
    vocab = lm.tokenizer.get_vocab()
    found = {vocab[name] for name in END_OF_TURN_TOKENS if name in vocab}
    return lm.eos_token_ids | {i for i in found if i in lm.special_token_ids}


class StopScanner:
    """Text handed out as it grows, cut before the first stop string: ``feed(piece)`` returns
    the text that can no longer be the start of a stop string and whether one was found;
    ``flush()`` the text held back at the end."""

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        # Hold back the longest tail that may still grow into a stop string.
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(stop[:n]):
                    keep = n
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def reply_steps(
    lm: LanguageModel, ids: list[int], *, max_new_tokens: int, temperature: float = 0.0,
    top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (), strip_leading: bool = False,
    deadline: float | None = None,
) -> Iterator[dict[str, Any]]:
    """The reply to prompt ``ids``, one forward per item: {"text": new text (may be empty),
    "finish_reason": None, then "stop" (end-of-turn token or stop string) or "length" (token
    limit, the model's context, or ``deadline``, a time.monotonic() value) on the last item,
    "prompt_tokens", "completion_tokens" (stop token not counted)}. ``max_new_tokens`` is cut
    to what fits in the model's context; ``strip_leading`` drops the reply's leading
    whitespace (a transcript's "Assistant:" is followed by a space)."""
    room = lm.n_ctx - len(ids) if lm.n_ctx else max_new_tokens
    if room < 1:
        raise ConfigError(f"the prompt is {len(ids)} tokens and fills the {lm.n_ctx} positions "
                          f"of {lm.model_id}; shorten it")
    gen = Generation(lm, max_new_tokens=min(max_new_tokens, room), temperature=temperature,
                     top_p=top_p, seed=seed, stop_ids=stop_token_ids(lm))
    text = IncrementalText(lm.decode)
    scanner = StopScanner(stop)
    leading = strip_leading
    token = gen.prefill([ids])[0]
    while True:
        assert token is not None  # one stream, still running
        end_token = token in gen.stop_ids
        piece = "" if end_token else scanner.feed(text.push(token))
        finish = "stop" if end_token or scanner.stopped else None
        if finish is None and (gen.done or (deadline is not None
                                            and time.monotonic() > deadline)):
            finish = "length"
        if finish is not None and not scanner.stopped:
            piece += scanner.feed(text.flush())
            piece += scanner.flush()
            if scanner.stopped:
                finish = "stop"
        if leading and piece:
            piece = piece.lstrip()
            leading = not piece
        n_tokens = len(gen.tokens[0]) - (1 if end_token else 0)
        yield {"text": piece, "finish_reason": finish, "prompt_tokens": len(ids),
               "completion_tokens": n_tokens}
        if finish is not None:
            return
        token = gen.step()[0]


def chat_steps(lm: LanguageModel, messages: Sequence[Mapping[str, str]], *,
               max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, stop: Sequence[str] = (), max_prompt_tokens: int | None = None,
               limit_name: str = "", deadline: float | None = None, reply_start: str = "",
               ) -> Iterator[dict[str, Any]]:
    """``reply_steps`` for chat messages: the prompt built (and checked, on the first step) by
    ``prompt_ids``; a transcript's reply also stops where the model starts the next turn, and
    loses its leading space. ``max_prompt_tokens``: default, the model's context less one.
    ``reply_start``: text written as the start of the assistant's turn, which the model
    continues (a scorer's "[" keeps a small model to a list); the items hold only what the
    model wrote after it."""
    limit = max_prompt_tokens or (lm.n_ctx - 1 if lm.n_ctx else 1 << 30)
    if max_prompt_tokens is None:
        limit_name = limit_name or f"{lm.model_id}'s context less one"
    ids = prompt_ids(lm, messages, max_tokens=limit, limit_name=limit_name)
    templated = lm.has_chat_template
    if reply_start:
        ids = ids + lm.tokenize(reply_start if templated else f" {reply_start}",
                                prepend_bos=False)
    yield from reply_steps(lm, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed,
                           stop=[*stop, *([] if templated else TRANSCRIPT_STOPS)],
                           strip_leading=not templated and not reply_start,
                           deadline=deadline)


def reply(lm: LanguageModel, messages: Sequence[Mapping[str, str]], **options: Any
          ) -> dict[str, Any]:
    """The whole reply at once (``chat_steps``'s options): {"text", "finish_reason",
    "prompt_tokens", "completion_tokens"}."""
    parts: list[str] = []
    last: dict[str, Any] = {}
    for item in chat_steps(lm, messages, **options):
        parts.append(item["text"])
        last = item
    return {**last, "text": "".join(parts)}
