"""An lm-eval model that scores only what is scored, and runs a shared prefix once.

``FastHFLM`` is lm-eval's own ``HFLM`` (same tokenisation, BOS handling, truncation
and request plumbing, so every lm-eval task works unchanged) with one method
replaced: ``_loglikelihood_tokens``. Two kinds of work HFLM does are skipped:

* The output head. HFLM computes it and a full-vocabulary log-softmax at every
  position; scoring needs only the continuation positions. With Gemma's
  262,144-token head that is most of the forward pass. Here final hidden states are
  gathered at continuation positions and only those go through the head.
* Repeated prefixes. The choices of one multiple-choice question repeat the same
  context (ARC, HellaSwag) or the same sentence start (WinoGrande). Neighbouring
  requests with a common token prefix become one *segment*: the prefix once, then
  each request's remainder as a branch that attends to the prefix and to itself only,
  with its true position ids. Segments are packed into rows with a block attention
  mask, so there is no batch-1 pass and almost no padding. Every scored position sees
  exactly the tokens it sees in HFLM's forward, so the numbers agree to float rounding.

Importing this module registers it with lm-eval as ``tailor-fast``:
``lm_eval.simple_evaluate(model="tailor-fast", model_args="pretrained=PATH", ...)``.
lm-eval's command line has no hook to import it, so ``tailor-lm-eval`` is that command
line with the model registered: ``tailor-lm-eval run --model tailor-fast ...``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from tailor.common.console import OwnBar
from tailor.models.heads import output_logits

Request = tuple[tuple[str, str] | None, list[int], list[int]]

MIN_SHARED_TOKENS = 4
"""Shorter common prefixes (a BOS and a word) are not worth a branch."""


@dataclass
class _Segment:
    """A shared prefix and one branch per request; ``scored`` maps requests to token columns."""

    prefix: list[int]
    branches: list[list[int]] = field(default_factory=list)
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    """(request index, columns within the segment whose hidden states score it, target tokens)."""

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(b) for b in self.branches)


@dataclass
class _PackedBatch:
    """One forward pass's inputs and where in its output each request is scored."""

    ids: torch.Tensor
    pos: torch.Tensor
    masks: torch.Tensor | dict[str, torch.Tensor]
    scored_rows: torch.Tensor
    scored_cols: torch.Tensor
    targets: list[list[int]]
    owners: list[int]
    """The request index each entry of ``targets`` answers."""


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@register_model("tailor-fast")
class FastHFLM(HFLM):
    """HFLM with continuation-only output-head scoring and shared-prefix packing for causal models.

    ``share_context`` turns prefix sharing on (the default in llm-tailor's config);
    ``pack_tokens`` is the length of a packed row (longer segments get a row of their own),
    and a forward pass holds at most ``batch_size * pack_tokens`` tokens.
    """

    share_context: bool = True
    pack_tokens: int = 256
    score_chunk_tokens: int = 256
    """Scored positions per output-head pass: their [n, vocabulary] logits and log-softmax are
    the largest tensors of evaluation (262,144 floats each for Gemma), so they are bounded."""
    on_progress: Callable[[int, int], None] | None = None
    """Called with (requests scored, requests in this call) after every batch."""

    def __init__(self, *args, device: str | None = None, **kwargs):
        # HFLM defaults to "cuda" and fails on a machine without one; by name from lm-eval
        # (model_args without device=) this model takes the GPU when there is one, else the CPU.
        super().__init__(*args, device=device or ("cuda" if torch.cuda.is_available() else "cpu"), **kwargs)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        rows_per_batch = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        segments = self._segments(requests)
        rows = _pack(segments, max(self.pack_tokens, max(len(s) for s in segments)))
        # Longest first (like HFLM): the first batch shows the worst-case memory at once.
        batches = _batches(rows, rows_per_batch * self.pack_tokens)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # A caller that follows progress itself (the flow's stage lines) gets no bar.
        with OwnBar(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0 or self.on_progress is not None,
            desc="Scoring loglikelihood requests",
        ) as bar:
            done = 0
            for batch in batches:
                for i, answer in self._score_rows(batch):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    bar.update(1)
                    done += 1
                if self.on_progress is not None:
                    self.on_progress(done, len(requests))
        return results  # type: ignore[return-value]

    def _segments(self, requests: list[Request]) -> list[_Segment]:
        """Neighbouring requests with a common prefix grouped into segments (requests come in document order)."""
        windows = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError("lm-eval request with an empty context or continuation")
            # Same window as HFLM: truncate from the left, drop the last token.
            windows.append(((context_enc + continuation_enc)[-(self.max_length + 1) :][:-1], continuation_enc))
        groups: list[tuple[int, list[int]]] = []  # (shared prefix length, request indices)
        for i, (tokens, _) in enumerate(windows):
            if self.share_context and groups:
                shared, members = groups[-1]
                common = _common_prefix_length(windows[members[0]][0][:shared], tokens)
                if common >= MIN_SHARED_TOKENS:
                    groups[-1] = (common, members + [i])
                    continue
            groups.append((len(tokens), [i]))
        segments = []
        for shared, members in groups:
            first = windows[members[0]][0]
            segment = _Segment(prefix=first[:shared])
            for i in members:
                tokens, continuation = windows[i]
                branch_start = len(segment)
                segment.branches.append(tokens[shared:])
                # Hidden state at position p scores token p + 1; prefix positions live in the prefix.
                columns = [
                    p if p < shared else branch_start + p - shared
                    for p in range(len(tokens) - len(continuation), len(tokens))
                ]
                segment.scored.append((i, columns, continuation))
            segments.append(segment)
        return segments

    def _score_rows(self, rows: list[list[_Segment]]) -> list[tuple[int, tuple[float, bool]]]:
        batch = self._packed(rows)
        with self._scoring_context():
            hidden = self.model.get_decoder()(
                input_ids=batch.ids, position_ids=batch.pos, attention_mask=batch.masks, use_cache=False
            ).last_hidden_state
            return self._answers_from_hidden(self.model, hidden, batch)

    @contextmanager
    def _scoring_context(self) -> Iterator[None]:
        """No gradients, and the mixed precision lm-eval was asked for (``mixed_precision_dtype``)."""
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            yield

    def _packed(self, rows: list[list[_Segment]]) -> _PackedBatch:
        """Token ids, true positions and block masks of packed rows, and where each request is scored."""
        width = max(sum(len(s) for s in row) for row in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        # Per column: segment number, branch number (0 = prefix) and true position; padding
        # columns get segment -1 and attend only to themselves.
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        branch = torch.zeros((len(rows), width), dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        scored_rows, scored_cols, targets, owners = [], [], [], []
        for r, row in enumerate(rows):
            col = 0
            for s, segment in enumerate(row):
                n_prefix = len(segment.prefix)
                ids[r, col : col + n_prefix] = torch.tensor(segment.prefix, dtype=torch.long)
                seg[r, col : col + len(segment)] = s
                pos[r, col : col + n_prefix] = torch.arange(n_prefix)
                offset = col + n_prefix
                for b, tokens in enumerate(segment.branches, start=1):
                    ids[r, offset : offset + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                    branch[r, offset : offset + len(tokens)] = b
                    pos[r, offset : offset + len(tokens)] = torch.arange(n_prefix, n_prefix + len(tokens))
                    offset += len(tokens)
                for i, columns, continuation in segment.scored:
                    scored_rows += [r] * len(columns)
                    scored_cols += [col + c for c in columns]
                    targets.append(continuation)
                    owners.append(i)
                col += len(segment)
        return _PackedBatch(
            ids=ids.to(self.device),
            pos=pos.to(self.device),
            masks=self._attention_masks(seg, branch, pos),
            scored_rows=torch.tensor(scored_rows, device=self.device),
            scored_cols=torch.tensor(scored_cols, device=self.device),
            targets=targets,
            owners=owners,
        )

    def _answers_from_hidden(
        self, model, hidden: torch.Tensor, batch: _PackedBatch
    ) -> list[tuple[int, tuple[float, bool]]]:
        """(request index, (loglikelihood, is_greedy)) from a model's final hidden states of a packed batch:
        the output head at the scored positions only, a bounded chunk at a time."""
        scored = hidden[batch.scored_rows, batch.scored_cols]
        target = torch.tensor([tok for t in batch.targets for tok in t], device=self.device)
        token_lp, greedy = [], []
        for start in range(0, len(target), self.score_chunk_tokens):
            chunk = slice(start, start + self.score_chunk_tokens)
            logprobs = F.log_softmax(output_logits(model, scored[chunk]).float(), dim=-1)
            token_lp.append(logprobs.gather(1, target[chunk].unsqueeze(1)).squeeze(1))
            greedy.append(logprobs.argmax(dim=-1) == target[chunk])
        return list(zip(batch.owners, _answers(torch.cat(token_lp), torch.cat(greedy), batch.targets)))

    def _attention_masks(self, seg: torch.Tensor, branch: torch.Tensor, pos: torch.Tensor):
        """Additive [B, 1, T, T] masks: same segment, prefix or own branch, causal in true positions.

        Models with sliding-window layers take one mask per layer type (the window applies
        to true positions, as in an unpacked forward); others take a single 4D mask.
        """
        q, k = (slice(None), slice(None), None), (slice(None), None, slice(None))
        allowed = (
            (seg[q] == seg[k]) & (seg[q] >= 0) & ((branch[k] == 0) | (branch[k] == branch[q])) & (pos[k] <= pos[q])
        )
        allowed |= torch.eye(seg.shape[1], dtype=torch.bool).unsqueeze(0)  # padding sees itself
        dtype = self.model.dtype if self.mixed_precision_dtype is None else self.mixed_precision_dtype

        def additive(ok: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros(ok.shape, dtype=dtype)
            mask.masked_fill_(~ok, torch.finfo(dtype).min)
            return mask.unsqueeze(1).to(self.device)

        config = self.model.config
        layer_types = set(getattr(config, "layer_types", None) or [])
        if "sliding_attention" not in layer_types:
            return additive(allowed)
        window = config.sliding_window
        in_window = allowed & (pos[q] - pos[k] < window)
        in_window |= torch.eye(seg.shape[1], dtype=torch.bool).unsqueeze(0)
        return {kind: additive(in_window if kind == "sliding_attention" else allowed) for kind in layer_types}


def _pack(segments: list[_Segment], capacity: int) -> list[list[_Segment]]:
    """Best-fit decreasing: segments into rows of at most ``capacity`` tokens."""
    rows: list[list[_Segment]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row number)
    for segment in sorted(segments, key=len, reverse=True):
        slot = bisect.bisect_left(free, (len(segment), -1))
        if slot < len(free):
            room, r = free.pop(slot)
        else:
            rows.append([])
            room, r = capacity, len(rows) - 1
        rows[r].append(segment)
        bisect.insort(free, (room - len(segment), r))
    return rows


def _batches(rows: list[list[_Segment]], token_budget: int) -> list[list[list[_Segment]]]:
    """Rows, longest first, in batches of at most ``token_budget`` padded tokens (at least one row)."""
    rows = sorted(rows, key=lambda row: -sum(len(s) for s in row))
    batches: list[list[list[_Segment]]] = []
    for row in rows:
        if batches and (len(batches[-1]) + 1) * sum(len(s) for s in batches[-1][0]) <= token_budget:
            batches[-1].append(row)
        else:
            batches.append([row])
    return batches


def _answers(token_lp: torch.Tensor, greedy: torch.Tensor, targets: list[list[int]]) -> list[tuple[float, bool]]:
    """(sum of target log-probs, all targets greedy) per request, from the per-token scores."""
    answers, offset = [], 0
    for t in targets:
        n = len(t)
        answers.append((float(token_lp[offset : offset + n].sum()), bool(greedy[offset : offset + n].all())))
        offset += n
    return answers


def lm_eval_cli() -> None:
    """lm-eval's own command line, with ``tailor-fast`` registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
