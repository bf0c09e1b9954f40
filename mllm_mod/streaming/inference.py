r"""Frame-by-frame streaming inference with the (MoD) KV cache, as VideoLLM-online's ``demo/inference.py``.

One forward per incoming frame: ',' (or '\n[' when a run of frames starts) and the frame's tokens. At
the frame's last token the model either predicts ',' (stay silent) or not: `replies_at` is the rule,
with ``threshold`` on ``P(',')``. When it speaks, ']\nAssistant:' is fed and the reply is generated
greedily until ``</s>``; then the stream goes on with '\n[' and the next frame. Every forward goes
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
from .data import Turn, user_frame_index
from .model import StreamForCausalLM
from .objective import Layout, StreamSequence

EVAL_THRESHOLD = 0.0  # models/modeling_live.py, stream_evaluate: reply where the argmax is not ','
DEMO_THRESHOLD = 0.725  # demo/inference.py: reply where P(',') < 0.725


def replies_at(logits: torch.Tensor, silence_token_id: int, threshold: float) -> torch.Tensor:
    """VideoLLM-online's reply decision at frame-final logits [..., V] -> [...] bool: reply where the
    argmax is not the silence token (',') or ``P(',') < threshold``. ``threshold = 0``: the argmax alone
    (its evaluation); 0.725: its demo; 0.5: nearly "P(silence) < 0.5" (the two differ only on ties)."""
    logits = logits.float()
    silent_argmax = logits.argmax(dim=-1) == silence_token_id
    p_silence = torch.softmax(logits, dim=-1)[..., silence_token_id]
    return ~silent_argmax | (p_silence < threshold)


@dataclass
class Reply:
    """What the model said after a frame (or a user turn)."""

    frame: int
    time: float
    text: str
    silence_prob: float  # P(',') where a frame decided; NaN for an answer to a user turn


class StreamSession:
    """A live stream: feed frames and user turns as they arrive; frames may trigger replies.

    threshold: see `replies_at` (default: the demo's 0.725).
    budget: a `CacheBudget` bounding the cache (None: unbounded).
    """

    def __init__(
        self,
        model: StreamForCausalLM,
        tokenizer: PreTrainedTokenizerBase,
        threshold: float = DEMO_THRESHOLD,
        max_new_tokens: int = 32,
        budget: CacheBudget | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.layout = Layout.of(tokenizer, self.config)
        self.threshold, self.max_new_tokens, self.budget = threshold, max_new_tokens, budget
        self.cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        self.spans: list[CachedSpan] = []
        self.position = 0  # true position of the next token
        self.frames_seen = 0
        self.in_run = False  # inside '[' ... ']': the next frame follows a ','
        self.device = next(model.parameters()).device
        if self.layout.bos:
            self.feed(self.layout.bos, kind="prompt")

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

    def _end_run(self) -> list[int]:
        r"""']\n' closing a run of frames, or the newline before a turn that follows a turn."""
        ids = self.layout.close if self.in_run else self.layout.newline
        self.in_run = False
        return ids

    def user(self, text: str, answer: bool = False, time: float | None = None) -> Reply | None:
        r"""A user turn (']\nUser: text'); with `answer`, the reply to it at once (as the demo answers a query)."""
        frame = self.frames_seen - 1
        self.feed(self._end_run() + self.layout.user(text), kind="user", frame=frame)
        if not answer:
            return None
        text = self.reply(frame, self.layout.newline)
        return Reply(frame=frame, time=frame / self.config.fps if time is None else time, text=text, silence_prob=float("nan"))

    def silence_prob(self, logits: torch.Tensor) -> float:
        return float(torch.softmax(logits.float(), dim=-1)[self.config.silence_token_id])

    def frame(self, pixel_values: torch.Tensor, time: float | None = None) -> Reply | None:
        """One incoming frame [3, S, S]; returns the reply it triggered, or None (silence)."""
        i = self.frames_seen
        lead = [self.layout.separator] if self.in_run else self.layout.open
        logits = self.feed(lead + self.layout.frame, pixel_values[None], kind="frame", frame=i)  # [n, V]
        self.frames_seen += 1
        self.in_run = True
        if not bool(replies_at(logits[-1], self.config.silence_token_id, self.threshold)):
            return None
        text = self.reply(i, self._end_run())
        time = i / self.config.fps if time is None else time
        return Reply(frame=i, time=time, text=text, silence_prob=self.silence_prob(logits[-1]))

    def reply(self, frame: int, lead: list[int]) -> str:
        """Feed `lead` + 'Assistant:' and generate greedily until ``</s>`` (or `max_new_tokens`, then
        ``</s>`` is fed: a reply in the cache always ends as in training); returns the text."""
        eos = self.layout.eos
        logits = self.feed(lead + self.layout.reply_prompt(), kind="reply", frame=frame)
        token = int(logits[-1].argmax())
        tokens = []
        while token != eos and len(tokens) < self.max_new_tokens:
            tokens.append(token)
            token = int(self.feed([token], kind="reply", frame=frame)[-1].argmax())
        self.feed([eos], kind="reply", frame=frame)
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


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
        session.in_run = seg.kind in ("open", "frame", "sep")
    return torch.cat(chunks, dim=0)


def narrate(
    session: StreamSession,
    pixel_values: torch.Tensor,
    times: np.ndarray,
    user_turns: Iterable[Turn] = (),
    answer_users: bool = True,
    progress: bool = True,
) -> Iterator[Reply]:
    """Stream frames [F, 3, S, S] (at `times` s) through `session`, reading each user turn after the
    last frame at or before its time (answered at once with `answer_users`, as the demo answers
    queries); yields every reply as it is made."""
    pending = sorted((t for t in user_turns if t.role == "user"), key=lambda t: t.time)
    fps = session.config.fps
    for i in tqdm(range(pixel_values.shape[0]), desc="streaming", unit="frame", disable=not progress):
        reply = session.frame(pixel_values[i], float(times[i]))
        if reply is not None:
            yield reply
        while pending and user_frame_index(pending[0].time, fps) <= i:
            turn = pending.pop(0)
            answer = session.user(turn.text, answer=answer_users, time=turn.time)
            if answer is not None:
                yield answer
