"""Continuous batching over the members: every answer in flight advances by one token per forward
pass, whatever member it is for.

One thread owns the model. Each step it (1) admits waiting requests while the batch has room,
encoding their prompts in one forward pass, (2) draws one token for every answer of the batch,
(3) lets finished answers leave, and (4) runs one forward pass over all remaining answers, each
with its own member's LoRA adapter: every member's LoRA factors stacked side by side and each
row masked to its own (serve/members.py), two matrix products per layer whatever the number of
members. A request that arrives while others decode joins at the next step, as in vLLM's
continuous batching; it does not wait for the batch to drain.

The batch's key/value cache, its rows right-aligned so that any row can join or leave between
two steps, is serve/batch.py.

Sampling is per answer: temperature, top-k (TOP_K, the project's sampler's) and top-p, with the
answer's own random generator, seeded from the request's `seed` and the answer's index, so the
same request gives the same answer whatever else is in the batch (up to floating-point ties:
a batch computes its rows with other kernels than one row alone, which can move a logit in its
last bits). Temperatures below GREEDY_BELOW are greedy. Log-probabilities are those of the
model's own distribution (log-softmax of the logits, before temperature, top-k or top-p), as
vLLM reports them by default.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from palm_tasks.llm.models import TOP_K
from palm_tasks.serve.batch import Batch
from palm_tasks.serve.prefixes import BLOCK, PrefixCache
from palm_tasks.serve.text import TextState, TokenLogprob

# Dividing logits by a temperature of 1e-91 (the API allows any number from 0 to 2) overflows
# them to inf and sampling fails; at 1e-3 sampling is greedy already.
GREEDY_BELOW = 1e-3
PROMPT_CHUNK = 256  # prompt tokens per forward pass when every position's logprobs are needed


class QueueFull(Exception):
    """More requests are waiting for room in the batch than the limit allows (HTTP 429)."""


@dataclass(frozen=True)
class Sampling:
    """How to draw one request's answers."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the k most likely
    prompt_logprobs: bool = False  # also each prompt token's (a completion's echo)
    presence_penalty: float = 0.0  # subtracted from the logit of every token the answer holds already
    frequency_penalty: float = 0.0  # ... times how often it holds it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    @property
    def adjusts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class Request:
    """One API request: `n` answers to each of `prompts` (token ids), by the adapter `adapter`.
    `on_event` is called from the engine's thread with Started, Tokens, Finished and Failed."""

    prompts: list[list[int]]
    adapter: str
    sampling: Sampling
    on_event: Callable[[object], None]
    n: int = 1
    stream: bool = False  # Tokens events as the answer grows (else only Finished, with everything)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def answers(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class Started:
    queued_s: float


@dataclass(frozen=True)
class Tokens:
    index: int  # the answer: prompt index x n + choice
    text: str  # the text that is final now (held back while it may start a stop string)
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    index: int
    text: str  # the whole answer, up to a stop string
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # each answer token's, with Sampling.logprobs
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # with Sampling.prompt_logprobs; first: None


@dataclass(frozen=True)
class Failed:
    status: int  # 503: waited too long; 500: the model failed
    message: str


class _Row:
    """One answer in the batch."""

    def __init__(self, request: Request, index: int, prompt: list[int], text: TextState, generator):
        self.request, self.index, self.prompt, self.text, self.generator = request, index, prompt, text, generator
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: tuple = ()
        self.done = False


def _seed(seed: int | None, index: int) -> int:
    """The random seed of answer `index` of a request: from its seed, or fresh entropy."""
    import numpy as np

    entropy = [seed, index] if seed is not None else None
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class Engine:
    """The decoding loop over `models` (serve.members.MemberModels) in a thread of its own."""

    def __init__(self, models, max_batch: int = 32, max_queue: int = 64, queue_timeout_s: float = 120.0,
                 prefix_cache_bytes: int = 256 * 2**20):
        import torch

        self.models = models  # its decode() is the tokenizer's, under its lock
        self.pad_id = models.tokenizer.pad_token_id
        self.max_batch, self.max_queue, self.queue_timeout_s = max_batch, max_queue, queue_timeout_s
        self.device = models.model.device if hasattr(models.model, "device") else torch.device("cpu")
        self.stop_ids = sorted(models.end_ids)
        self._waiting: collections.deque[Request] = collections.deque()
        self._controls: collections.deque = collections.deque()
        self._rows: list[_Row] = []  # the answers in the batch, in the order of its rows
        self._admitting: list[_Row] = []  # rows whose prompts are being encoded
        self._batch = Batch(self._run, self.device, models.model.config)
        self.prefixes = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()  # held for each step; paused() holds it between steps
        self._stopping = False
        self.steps = self.completed = self.admitted = 0
        self.largest_batch = 0
        self.in_use: collections.Counter[str] = collections.Counter()  # answers per adapter, waiting or running
        self._thread = threading.Thread(target=self._loop, name="palm-engine", daemon=True)
        self._thread.start()

    # --- what other threads call -------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue `request`; QueueFull when max_queue requests wait already."""
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests wait for room in the batch "
                                f"(at most {self.max_queue}); retry later")
            self._waiting.append(request)
            self.in_use[request.adapter] += request.answers
            self._wake.notify()

    def call_between_steps(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` in the engine's thread between two steps (adapters are loaded and deleted
        there: a forward pass must not see the model change under it)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._controls.append((fn, future))
            self._wake.notify()
        return future

    def complete(self, adapter: str, prompts: list[list[int]], sampling: Sampling, n: int = 1) -> list[Finished]:
        """The answers of one request, waited for (palm generate, tests, benchmarks); RuntimeError
        when it fails."""
        done, answers, failures = threading.Event(), {}, []

        def on_event(event):
            if isinstance(event, Finished):
                answers[event.index] = event
                if len(answers) == n * len(prompts):
                    done.set()
            elif isinstance(event, Failed):
                failures.append(event)
                done.set()

        self.submit(Request(prompts, adapter, sampling, on_event, n))
        done.wait()
        if failures:
            raise RuntimeError(failures[0].message)
        return [answers[i] for i in sorted(answers)]

    @contextlib.contextmanager
    def paused(self):
        """No step runs inside this block (requests still queue)."""
        with self._step_lock:
            yield

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=60)

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._rows or self._controls):
                    self._wake.wait()
                if self._stopping:
                    break
            with self._step_lock:
                try:
                    self._step()
                except Exception as exc:  # a bug or an out-of-memory: fail what is in flight, keep serving
                    import traceback

                    traceback.print_exc()
                    self._fail_all(f"the model failed ({type(exc).__name__}: {str(exc)[:200]})")

    def _step(self) -> None:
        self._drop_cancelled()  # first: a control that deletes an adapter sees who still uses it
        while self._controls:
            fn, future = self._controls.popleft()
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 (handed to the caller)
                future.set_exception(exc)
        self._admit()
        if not self._rows:
            return
        self.steps += 1
        self.largest_batch = max(self.largest_batch, len(self._rows))
        tokens = self._draw()
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) < len(self._rows):
            tokens = tokens[keep] if keep else tokens[:0]
            self._keep(keep)
        if self._rows:
            self._forward(tokens)

    def _fail_all(self, message: str) -> None:
        """Every answer in the batch or being admitted fails with `message`; the engine goes on."""
        failed = set()
        for row in self._rows + self._admitting:
            if not row.done:
                row.done = True
                self._release(row.request, 1)
                if id(row.request) not in failed:
                    failed.add(id(row.request))
                    row.request.on_event(Failed(500, message))
        self._rows, self._admitting = [], []
        self._batch.keep([])

    def _release(self, request: Request, answers: int) -> None:
        with self._wake:
            self.in_use[request.adapter] -= answers
            if self.in_use[request.adapter] <= 0:
                del self.in_use[request.adapter]

    def _drop_cancelled(self) -> None:
        gone = [i for i, row in enumerate(self._rows) if row.request.cancelled.is_set()]
        for i in gone:
            self._rows[i].done = True
            self._release(self._rows[i].request, 1)
        if gone:
            self._keep([i for i in range(len(self._rows)) if i not in set(gone)])

    def _admit(self) -> None:
        """Move waiting requests into the batch while there is room (first come, first served)."""
        new: list[_Row] = []
        now = time.monotonic()
        while True:
            with self._wake:
                if not self._waiting:
                    break
                request = self._waiting[0]
                late = now - request.enqueued > self.queue_timeout_s
                if not (request.cancelled.is_set() or late) and \
                        len(self._rows) + len(new) + request.answers > self.max_batch:
                    break
                self._waiting.popleft()
            if request.cancelled.is_set() or late:
                self._release(request, request.answers)
                if late and not request.cancelled.is_set():
                    request.on_event(Failed(503, f"waited more than {self.queue_timeout_s:g} s for room in the "
                                                 "batch; retry later"))
                continue
            request.on_event(Started(now - request.enqueued))
            self.admitted += 1
            for p, prompt in enumerate(request.prompts):
                for c in range(request.n):
                    index = p * request.n + c
                    new.append(_Row(request, index, prompt, TextState(self.models, request.sampling.stop),
                                    self._generator(_seed(request.sampling.seed, index))))
        if new:
            self._admitting = new
            self._prefill(new)
            self._admitting = []

    def _generator(self, seed: int):
        import torch

        return torch.Generator(device=self.device).manual_seed(seed)

    # --- the model -------------------------------------------------------------------------------

    def _run(self, input_ids, mask, positions, cache, adapters: list[str], keep: int = 1):
        """The model on a batch whose row i is for adapter adapters[i] (MemberModels.forward)."""
        import torch

        with torch.no_grad():
            return self.models.forward(adapters, input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                       cache=cache, use_cache=True, logits_to_keep=keep).logits

    def _prefill(self, rows: list[_Row]) -> None:
        """Encode the new rows' prompts (each distinct prompt and adapter once) and join the batch."""
        import torch

        distinct: dict[tuple, list[_Row]] = {}
        for row in rows:
            distinct.setdefault((tuple(row.prompt), row.request.adapter, row.request.sampling.prompt_logprobs),
                                []).append(row)
        by_prefix: dict[int, list[tuple]] = {}  # the length of the known beginning -> the prompts
        known = {}
        for k in (k for k in distinct if not k[2]):
            known[k], length = self.prefixes.longest(k[1], list(k[0])) if self.prefixes else (None, 0)
            by_prefix.setdefault(length, []).append(k)
        parts = []  # (prefilled part, the rows each of its rows stands for)
        for length, keys in by_prefix.items():
            prefix = None if not length else [
                (torch.cat([known[k][i][0] for k in keys]), torch.cat([known[k][i][1] for k in keys]))
                for i in range(len(known[keys[0]]))]
            part = self._batch.prefill([list(k[0])[length:] for k in keys], [k[1] for k in keys], self.pad_id,
                                       prefix, length)
            self._remember(part, keys, length)
            parts.append((part, [distinct[k] for k in keys]))
        parts += [self._prefill_with_logprobs(list(k[0]), k[1], distinct[k]) for k in distinct if k[2]]
        for part, groups in parts:
            self._batch.add(part, torch.tensor([i for i, group in enumerate(groups) for _ in group],
                                               device=self.device))
            self._rows += [r for group in groups for r in group]

    def _remember(self, part, keys: list[tuple], known: int) -> None:
        """Keep the states of each prompt's beginning (whole blocks, not its last token) for later ones."""
        if self.prefixes is None:
            return
        for i, (prompt, adapter, _) in enumerate(keys):
            length = (len(prompt) - 1) // BLOCK * BLOCK
            if length > known:
                self.prefixes.store(adapter, list(prompt[:length]), self._batch.row_states(part, i, length))

    def _prefill_with_logprobs(self, prompt: list[int], adapter: str, rows: list[_Row]):
        """One prompt in chunks of PROMPT_CHUNK tokens, keeping each token's log-probability
        (an echo with logprobs): the logits of every position of a chunk, never of the whole prompt."""
        import torch

        k = rows[0].request.sampling.logprobs or 0
        cache = self._batch.new_cache()
        ids = torch.tensor([prompt], device=self.device)
        found: list[TokenLogprob | None] = [None]
        logits = None
        for start in range(0, len(prompt), PROMPT_CHUNK):
            chunk = ids[:, start:start + PROMPT_CHUNK]
            mask = torch.ones((1, start + chunk.shape[1]), dtype=torch.long, device=self.device)
            positions = torch.arange(start, start + chunk.shape[1], device=self.device)[None]
            out = self._run(chunk, mask, positions, cache, [adapter], keep=0)[0]
            if logits is not None:  # the previous chunk's last position predicts this chunk's first token
                out = torch.cat([logits[None], out])
                targets = ids[0, start:start + chunk.shape[1]]
            else:
                targets = ids[0, 1:chunk.shape[1]]
            found += TokenLogprob.of_targets(self.models, out[:len(targets)], targets, k)
            logits = out[-1]
        for row in rows:
            row.prompt_logprobs = tuple(found)
        mask = torch.ones((1, len(prompt)), dtype=torch.long, device=self.device)
        return (cache, mask, torch.tensor([len(prompt)], device=self.device), logits[None]), [rows]

    def _draw(self):
        """One token for every row, from its logits; events for its text. The log-probabilities
        reported are the model's own (before penalties, biases, temperature, top-k and top-p)."""
        import torch

        logits = self._batch.logits.float()
        wanted = [row.request.sampling.logprobs is not None for row in self._rows]
        logprobs = torch.log_softmax(logits, dim=-1) if any(wanted) else None
        scores = logits
        if any(row.request.sampling.adjusts for row in self._rows):
            scores = logits.clone()
            for i, row in enumerate(self._rows):
                s = row.request.sampling
                if s.logit_bias:
                    ids, bias = zip(*s.logit_bias)
                    scores[i, list(ids)] += torch.tensor(bias, device=scores.device)
                if (s.presence_penalty or s.frequency_penalty) and row.tokens:
                    counts = torch.bincount(torch.tensor(row.tokens, device=scores.device),
                                            minlength=scores.shape[-1]).float()
                    scores[i] -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float()
        tokens = torch.argmax(scores, dim=-1)
        for i, row in enumerate(self._rows):
            s = row.request.sampling
            if not s.greedy:
                top, index = torch.topk(scores[i], min(TOP_K, scores.shape[-1]))
                probs = torch.softmax(top / s.temperature, dim=-1)
                if s.top_p < 1.0:  # the smallest set of the most likely tokens holding top_p
                    keep = (torch.cumsum(probs, -1) - probs) < s.top_p
                    keep[0] = True  # the most likely always: a top_p of 5e-324 is 0 in float32 (the fuzz test)
                    probs = probs * keep
                tokens[i] = index[torch.multinomial(probs, 1, generator=row.generator)[0]]
        chosen = tokens.tolist()
        for i, row in enumerate(self._rows):
            if row.request.sampling.max_tokens == 0:  # the prompt's log-probabilities only (an echo)
                self._finish(row, "length")
                continue
            token = chosen[i]
            row.tokens.append(token)
            entry = ()
            if wanted[i]:
                entry = tuple(TokenLogprob.of_targets(self.models, logprobs[i:i + 1], tokens[i:i + 1],
                                                      row.request.sampling.logprobs, normalized=True))
                row.logprobs += entry
            ended = token in self.stop_ids
            text, stopped = row.text.add(None if ended else token)
            if row.request.stream and (text or entry):
                row.request.on_event(Tokens(row.index, text, entry))
            if ended or stopped or len(row.tokens) >= row.request.sampling.max_tokens:
                self._finish(row, "stop" if ended or stopped else "length")
        return tokens

    def _finish(self, row: _Row, reason: str) -> None:
        rest = row.text.flush()
        if rest and row.request.stream:
            row.request.on_event(Tokens(row.index, rest))
        row.done = True
        self.completed += 1
        self._release(row.request, 1)
        row.request.on_event(Finished(row.index, row.text.final, reason, len(row.prompt), len(row.tokens),
                                      tuple(row.logprobs), row.prompt_logprobs))

    def _keep(self, keep: list[int]) -> None:
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _forward(self, tokens) -> None:
        self._batch.step(tokens, [row.request.adapter for row in self._rows])
