"""The OpenAI response shapes: chat completions, (legacy) completions, their stream chunks, and
log-probabilities as each API reports them, built from the engine's events (serve/engine.py).

Chat: `choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`
with exactly top_logprobs alternatives. Completions: `{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`, each `top_logprobs` entry a dict of the `logprobs` most likely tokens plus the
chosen one (so up to logprobs + 1 entries, as the OpenAI API documents); with echo, the prompt's
tokens come first and the first of them has no log-probability (null).
"""

from __future__ import annotations

import json
import time

from palm_tasks.serve.engine import Finished
from palm_tasks.serve.text import TokenLogprob


def chat_logprob(entry: TokenLogprob) -> dict:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode("utf-8")),
            "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
                             for _, text, lp in entry.top]}


def completion_logprobs(entries: list[TokenLogprob], start_offset: int = 0) -> dict:
    """The completions API's logprobs object for these tokens (an entry whose logprob is None:
    the first token of an echoed prompt); text offsets count from `start_offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start_offset
    for entry in entries:
        out["text_offset"].append(offset)
        out["tokens"].append(entry.token)
        out["token_logprobs"].append(entry.logprob)
        if entry.logprob is None:
            out["top_logprobs"].append(None)
        else:
            top = {text: lp for _, text, lp in entry.top}
            top.setdefault(entry.token, entry.logprob)
            out["top_logprobs"].append(top)
        offset += len(entry.token)
    return out


def prompt_entries(finished: Finished, prompt: list[int], decode) -> list[TokenLogprob]:
    """An echoed prompt's tokens with their log-probabilities (the first has none)."""
    first = [TokenLogprob(prompt[0], decode([prompt[0]]), None)]
    return first + [e for e in finished.prompt_logprobs[1:] if e is not None]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_body(answer_id: str, model: str, fingerprint: str, finished: list[Finished], logprobs: bool,
              prompt_tokens: int, served: dict) -> dict:
    """A chat completion; the text stripped of surrounding whitespace, as `palm generate` prints it."""
    choices = []
    for f in finished:
        choices.append({"index": f.index, "message": {"role": "assistant", "content": f.text.strip(),
                                                      "refusal": None},
                        "logprobs": {"content": [chat_logprob(e) for e in f.logprobs], "refusal": None}
                        if logprobs else None,
                        "finish_reason": f.finish_reason})
    return {"id": answer_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
            "usage": usage(prompt_tokens, sum(f.completion_tokens for f in finished)), "palm": served}


def completion_choice(f: Finished, prompt_text: str | None, echo_entries, logprobs: list | None) -> dict:
    """One completion choice; `prompt_text` before the answer with echo, `echo_entries` the
    prompt's tokens (with echo and logprobs), `logprobs` the answer's (None: not asked for)."""
    text = (prompt_text or "") + f.text
    out = None if logprobs is None else completion_logprobs(list(echo_entries or []) + list(logprobs))
    return {"index": f.index, "text": text, "logprobs": out, "finish_reason": f.finish_reason}


def completion_body(answer_id: str, model: str, fingerprint: str, choices: list[dict], prompt_tokens: int,
                    completion_tokens: int, served: dict) -> dict:
    return {"id": answer_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens), "palm": served}


def event(payload: dict) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(payload) + "\n\n"


DONE = "data: [DONE]\n\n"
