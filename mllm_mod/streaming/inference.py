"""Frame-by-frame streaming inference with the (MoD) KV cache.

One forward per incoming frame; the frame's last token gives the silence probability. Under the
threshold the model replies (greedy, until ``</s>``), then the stream continues. Every forward goes
through `StreamSession.feed`, which keeps the true positions (explicit ``position_ids``: after an
eviction they are no longer the cache length), the list of cached spans, and the optional budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from ..compat import cache_kwargs
from .budget import CacheBudget, CachedSpan, cache_slots, make_room
from .data import Turn, frame_index
from .model import StreamForCausalLM
from .objective import REPLY_PREFIX, USER_PREFIX, StreamSequence, text_ids


@dataclass
class Reply:
    """What the model said after a frame."""

    frame: int
    time: float
    text: str
    silence_prob: float


class StreamSession:
    """A live stream: feed user turns and frames as they arrive; frames may trigger replies.

    threshold: reply when the silence probability at a frame falls below it.
    budget: a `CacheBudget` bounding the cache (None: unbounded).
    """

    def __init__(
        self,
        model: StreamForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        threshold: float = 0.5,
        max_new_tokens: int = 32,
        budget: CacheBudget | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.threshold, self.max_new_tokens, self.budget = threshold, max_new_tokens, budget
        self.cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        self.spans: list[CachedSpan] = []
        self.position = 0  # true position of the next token
        self.frames_seen = 0
        self.device = next(model.parameters()).device
        if tokenizer.bos_token_id is not None:
            self.feed([tokenizer.bos_token_id], kind="prompt")

    @property
    def cached_tokens(self) -> int:
        return cache_slots(self.cache)

    @torch.no_grad()
    def feed(self, ids: list[int], pixel_values: torch.Tensor | None = None, kind: str = "text", frame: int = -1):
        """Run `ids` (and their frames [F, 3, S, S]) through the model, cached; returns logits [n, V]."""
        n = len(ids)
        if self.budget is not None:
            self.spans = make_room(self.cache, self.spans, n, self.budget)
        start = cache_slots(self.cache)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, n]
        positions = torch.arange(self.position, self.position + n, device=self.device)[None]  # [1, n]
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device)
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(self.cache),
        )
        self.position += n
        self._record(kind, start, n, frame)
        return out.logits[0]  # [n, V]

    def _record(self, kind: str, start: int, n: int, frame: int) -> None:
        last = self.spans[-1] if self.spans else None
        before_frames = self.frames_seen == 0 and kind != "frame"
        if last is not None and (before_frames or (kind == "reply" and last.kind == "reply" and last.frame == frame)):
            last.slots += n  # the prompt (all before the first frame) and a growing reply are one span each
        else:
            self.spans.append(CachedSpan("prompt" if before_frames else kind, start, n, frame))

    def user(self, text: str) -> None:
        """A user turn, read before the next frame."""
        self.feed(text_ids(self.tokenizer, f"{USER_PREFIX} {text}"), kind="user", frame=self.frames_seen)

    def silence_prob(self, logits: torch.Tensor) -> float:
        return float(torch.softmax(logits.float(), dim=-1)[self.config.silence_token_id])

    def frame(self, pixel_values: torch.Tensor, time: float | None = None) -> Reply | None:
        """One incoming frame [3, S, S]; returns the reply it triggered, or None (silence)."""
        i = self.frames_seen
        ids = [self.config.frame_token_id] * self.config.tokens_per_frame
        logits = self.feed(ids, pixel_values[None], kind="frame", frame=i)  # [N, V]
        self.frames_seen += 1
        p = self.silence_prob(logits[-1])
        if p >= self.threshold:
            return None
        text = self.reply(logits[-1], i)
        return Reply(frame=i, time=i / self.config.fps if time is None else time, text=text, silence_prob=p)

    def reply(self, logits: torch.Tensor, frame: int) -> str:
        """Greedy reply from the decision logits [V]; the reply (ended by ``</s>``) joins the cache."""
        eos = self.tokenizer.eos_token_id
        banned = torch.tensor([self.config.silence_token_id, self.config.frame_token_id], device=logits.device)
        token = int(logits.float().index_fill(0, banned, float("-inf")).argmax())
        tokens = []
        while token != eos and len(tokens) < self.max_new_tokens:
            tokens.append(token)
            token = int(self.feed([token], kind="reply", frame=frame)[-1].argmax())
        self.feed([eos], kind="reply", frame=frame)  # a reply ends with </s>, as in training
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        prefix = REPLY_PREFIX.strip()
        return text[len(prefix) :].strip() if text.startswith(prefix) else text


def teacher_forced_stream(session: StreamSession, seq: StreamSequence) -> torch.Tensor:
    """Feed `seq` segment by segment (frames one forward each, replies as given); logits [T, V].

    Equals one full forward over ``seq.input_ids`` (`tests/test_streaming.py` pins it); the session's
    BOS is the sequence's prompt segment.
    """
    chunks = []
    frames = iter(seq.pixel_values) if seq.pixel_values is not None else iter(())
    for seg in seq.segments:
        ids = seq.input_ids[seg.start : seg.stop].tolist()
        if seg.kind == "prompt":
            if session.position != len(ids):
                raise ValueError("the session's prompt does not match the sequence's")
            continue
        pixels = next(frames)[None] if seg.kind == "frame" else None
        chunks.append(session.feed(ids, pixels, kind=seg.kind, frame=seg.frame))
        session.frames_seen += seg.kind == "frame"
    return torch.cat(chunks, dim=0)


def narrate(
    session: StreamSession,
    pixel_values: torch.Tensor,
    times: np.ndarray,
    user_turns: Iterable[Turn] = (),
    progress: bool = True,
) -> Iterator[Reply]:
    """Stream frames [F, 3, S, S] (at `times` s) through `session`, reading each user turn before the
    frame it belongs to; yields every reply as it is made."""
    pending = sorted((t for t in user_turns if t.role == "user"), key=lambda t: t.time)
    fps = session.config.fps
    for i in tqdm(range(pixel_values.shape[0]), desc="streaming", unit="frame", disable=not progress):
        while pending and frame_index(pending[0].time, fps) <= i:
            session.user(pending.pop(0).text)
        reply = session.frame(pixel_values[i], float(times[i]))
        if reply is not None:
            yield reply
