"""An answer's text as its tokens arrive, and the log-probabilities the API reports.

`TextState` turns an answer's token ids into text that is final: the whole answer is decoded
again at each token (a byte-level tokenizer can split a character over two tokens, which decode
to U+FFFD until the second arrives), text that could be the start of a stop string is held back
until it is known not to be one, and the answer ends before the first stop string. A stream
therefore never sends text it later has to take back, and ends exactly where the non-streamed
answer ends.
"""

from __future__ import annotations

from dataclasses import dataclass

LOWEST_LOGPROB = -9999.0  # JSON has no -inf: a token the model gives probability 0 is reported so


@dataclass(frozen=True)
class TokenLogprob:
    """One token: its text, its log-probability, and the `top` most likely tokens at its place."""

    token_id: int
    token: str
    logprob: float | None  # None: the first token of a prompt, which nothing predicts
    top: tuple[tuple[int, str, float], ...] = ()

    @staticmethod
    def of_targets(tokenizer, scores, targets, k: int | None, normalized: bool = False) -> list["TokenLogprob"]:
        """For each row of `scores` (logits, or log-probabilities when `normalized`), the
        log-probability of the token `targets[i]` and the k most likely tokens."""
        import torch

        logprobs = scores.float() if normalized else torch.log_softmax(scores.float(), dim=-1)
        chosen = logprobs.gather(-1, targets[:, None].long())[:, 0].tolist()
        top_values = top_ids = None
        if k:
            top_values, top_ids = torch.topk(logprobs, k, dim=-1)
            top_values, top_ids = top_values.tolist(), top_ids.tolist()
        out = []
        for i, target in enumerate(targets.tolist()):
            top = () if not k else tuple((t, tokenizer.decode([t]), max(v, LOWEST_LOGPROB))
                                         for t, v in zip(top_ids[i], top_values[i]))
            out.append(TokenLogprob(target, tokenizer.decode([target]), max(chosen[i], LOWEST_LOGPROB), top))
        return out


class TextState:
    """The text of one answer as tokens are added; `add` returns what is final and new."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` handed out already
        self.stopped = False

    def add(self, token: int | None) -> tuple[str, bool]:
        """Add a token (None: none, the answer ended on an end-of-turn token): (the new final
        text, whether a stop string ended the answer)."""
        if self.stopped:
            return "", True
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text)), True
        self.text = text
        return self._release(len(text) - self._held_back(text)), False

    def flush(self) -> str:
        """The text held back, now final (the answer ended)."""
        return self._release(len(self.text))

    @property
    def final(self) -> str:
        return self.text

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that are not final: a character still being decoded,
        or the beginning of a stop string."""
        held = 1 if text.endswith("\ufffd") else 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held
