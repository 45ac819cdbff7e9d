"""Scoring labels in the server (a composition root): the pipeline's score_label with the model
the server loaded as the scorer, every model step a job on the model worker, so scoring
interleaves with text search and steering; one label at a time.

The scorer is the loaded model through the chat contract (ChatBackend): `EngineChat` asks it
through the engine's chat generation (the service's chat_stream, as `POST /v1/chat/completions`
does: one stream, no steering), the model's chat template around the messages when it has one,
else a plain transcript, so a reply here is the reply the local backend and /v1 give. Detection's
windows at zero come from encoding a seeded sample of the run's stored sequences with the loaded
model and SAE (the sample `saescope explain` draws with its defaults), once per SAE and run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from app.api.model_service import EngineState, ModelService
from app.api.model_worker import ModelWorker
from app.api.public_paths import public_path
from app.errors import BusyError, ConfigError, ConflictError, UnavailableError
from app.pipeline.autointerp.backends import ChatBackend, ChatMessage, ChatOptions
from app.pipeline.autointerp.label_scoring import score_label
from app.pipeline.autointerp.negatives import SequencePool, encode_pool_steps, sample_sequences
from app.pipeline.autointerp.scoring import DETECTION, ScoringOptions
from app.store import queries
from app.store.db import read_session
from app.store.read_models import LabelInfo

POOL_SEQUENCES = 64  # saescope explain's --pool-sequences default
POOL_SEED = 0  # and its --seed default: the same windows at zero
MAX_PROMPT_TOKENS = 8192  # the model's own context is the real bound (a clear 409 past it)
BUSY_RETRIES = 30  # a full model queue: wait Retry-After and ask again, this many times
SCORING_RETRY_AFTER = 15  # seconds; a second label while one is being scored


class EngineChat:
    """A ChatBackend over the server's model service, called from a scoring thread: each reply
    is a job on the model worker, one forward per step, on the event loop `loop`."""

    def __init__(self, *, service: ModelService, worker: ModelWorker,
                 loop: asyncio.AbstractEventLoop, sae_id: str, stop: threading.Event) -> None:
        self.service = service
        self.worker = worker
        self.loop = loop
        self.sae_id = sae_id
        self.stop = stop
        # As the local backend names itself, so scores by the same model agree on their scorer.
        self.name = f"local:{service.model_id}"

    def complete(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str:
        if self.stop.is_set():
            raise UnavailableError("scoring stopped: the request went away or the server is "
                                   "shutting down")
        try:
            return asyncio.run_coroutine_threadsafe(self._reply(messages, options),
                                                    self.loop).result()
        except ConfigError as exc:  # e.g. a prompt longer than the model's context
            raise ConflictError(f"{self.service.model_id} cannot answer the scorer's prompt "
                                f"({exc})") from None

    async def _reply(self, messages: Sequence[ChatMessage], options: ChatOptions) -> str:
        def steps() -> Any:
            return self.service.chat_stream(
                messages=list(messages), max_tokens=options.max_tokens,
                temperature=options.temperature, seed=options.seed, stop=options.stop,
                reply_start=options.reply_start, max_prompt_tokens=MAX_PROMPT_TOKENS)

        parts: list[str] = [options.reply_start]
        async with await _admitted(self.worker, steps) as stream:
            async for item in stream:
                parts.append(item["text"])
        return "".join(parts)


async def _admitted(worker: ModelWorker, steps: Callable[[], Any]) -> Any:
    """worker.stream(steps), waiting Retry-After while the queue is full (a scoring is dozens
    of jobs; one full moment should not lose the ones done)."""
    for _ in range(BUSY_RETRIES):
        try:
            return worker.stream(steps)
        except BusyError as exc:
            await asyncio.sleep(exc.retry_after or 1)
    return worker.stream(steps)


class ServerLabelScorer:
    """The server's LabelScorer (app/api/label_scorer.py). `backend` builds the scorer from the
    model service (default: EngineChat; tests may plug a scripted one); `options`: how many
    windows and how many per prompt (default: as `saescope explain`)."""

    def __init__(self, *, db: Engine, engine_state: EngineState, worker: ModelWorker,
                 home: Path, backend: Callable[..., ChatBackend] | None = None,
                 options: ScoringOptions | None = None) -> None:
        self.db = db
        self.home = home  # server paths in messages show relative to it (public_paths)
        self.engine_state = engine_state
        self.worker = worker
        self.backend = backend or EngineChat
        self.options = options
        self._running = False
        self._pools: dict[tuple[str, int], SequencePool] = {}

    def _service(self) -> ModelService:
        return self.engine_state.require("scoring a label needs the server's model")

    def _finished(self, work: asyncio.Future[Any]) -> None:
        self._running = False
        if not work.cancelled():
            work.exception()  # retrieved: a cancelled request's stopped thread is not an error

    async def score(self, *, label: LabelInfo, methods: Sequence[str], seed: int) -> None:
        service = self._service()
        if self._running:
            raise BusyError(f"another label is being scored; retry in {SCORING_RETRY_AFTER} s",
                            retry_after=SCORING_RETRY_AFTER)
        self._running = True  # on the event loop: no other task runs between check and set
        stop = threading.Event()
        try:
            pool = await self._pool(service, label.sae_id) if DETECTION in methods else None
            scorer = self.backend(service=service, worker=self.worker,
                                  loop=asyncio.get_running_loop(), sae_id=label.sae_id,
                                  stop=stop)
            work = asyncio.ensure_future(asyncio.to_thread(
                score_label, self.db, label_id=label.id, scorer=scorer, methods=tuple(methods),
                seed=seed, negatives=pool, options=self.options))
        except BaseException:
            self._running = False
            raise
        # The thread runs on if this request is cancelled; it stops at its next reply and only
        # then frees the scorer for the next label.
        work.add_done_callback(self._finished)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()
            raise

    async def _pool(self, service: ModelService, sae_id: str) -> SequencePool:
        """Windows at zero for `sae_id`: its run's sample encoded by the loaded model and SAE."""
        loaded = service.saes.get(sae_id)
        if loaded is None:
            why = public_path(service.skipped.get(sae_id, "it is not in the database"),
                              home=self.home)
            raise ConflictError(f"detection encodes stored text with SAE {sae_id}, which this "
                                f"server has not loaded ({why}); score with fuzzing only")

        def read() -> Any:
            with read_session(self.db) as session:
                return queries.sae_weights(session=session, sae_id=sae_id)

        weights = await asyncio.to_thread(read)
        if weights.model_id != service.model_id:
            raise ConflictError(f"SAE {sae_id}'s run read model {weights.model_id}; this server "
                                f"loaded {service.model_id}; score with fuzzing only")
        key = (sae_id, weights.run_id)
        if key not in self._pools:
            _, tokens = await asyncio.to_thread(sample_sequences, self.db, sae_id=sae_id,
                                                n_sequences=POOL_SEQUENCES, seed=POOL_SEED)
            pool = None
            lm = getattr(service, "lm", None)
            async with await _admitted(self.worker, lambda: encode_pool_steps(
                    lm=lm, sae=loaded.sae, hook_name=loaded.hook_name, tokens=tokens)) as stream:
                async for item in stream:
                    pool = item if item is not None else pool
            assert pool is not None
            # One pool per SAE: a rebuilt SAE (a new live run) replaces its old one.
            self._pools = {k: v for k, v in self._pools.items() if k[0] != sae_id}
            self._pools[key] = pool
        return self._pools[key]
