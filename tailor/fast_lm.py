"""An lm-eval model that scores only what is scored.

``FastHFLM`` is lm-eval's own ``HFLM`` (same tokenisation, BOS handling, truncation
and request plumbing, so every lm-eval task works unchanged) with one method
replaced: ``_loglikelihood_tokens``. HFLM computes the output head and a full-vocabulary
log-softmax at every position of every request; multiple-choice and LAMBADA scoring
only need the continuation positions. With Gemma's 262,144-token head that is most of
the forward pass. Here the decoder runs once per batch, its final hidden states are
gathered at continuation positions, and only those go through the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from .kd_loss import output_logits

Request = tuple[tuple[str, str] | None, list[int], list[int]]


class FastHFLM(HFLM):
    """HFLM with continuation-only output-head scoring for causal models.

    With ``share_context``, requests with the same context (the choices of
    one multiple-choice question) run the context once and its KV cache is reused by
    every continuation; the numbers agree with the full forward to float rounding.
    """

    share_context: bool = False

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        batch_size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else 8)
        plain, groups = self._split_shared_contexts(requests)
        # Longest first (like HFLM): the first batch shows the worst-case memory at once.
        plain.sort(key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        work = [plain[s:s + batch_size] for s in range(0, len(plain), batch_size)]
        work += [("shared", members) for members in groups]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                  desc="Scoring loglikelihood requests") as bar:
            for item in work:
                if isinstance(item, tuple):
                    members = item[1]
                    answers = self._score_shared_context(requests[members[0]][1],
                                                         [requests[i][2] for i in members])
                else:
                    members = item
                    answers = self._score_batch([requests[i] for i in members])
                for i, answer in zip(members, answers):
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(members))
        return results  # type: ignore[return-value]

    def _split_shared_contexts(self, requests: list[Request]) -> tuple[list[int], list[list[int]]]:
        """Indices scored one by one, and groups of indices sharing an untruncated context."""
        if not self.share_context:
            return list(range(len(requests))), []
        by_context: dict[tuple[int, ...], list[int]] = {}
        plain = []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            if context_enc and len(context_enc) + len(continuation_enc) <= self.max_length + 1:
                by_context.setdefault(tuple(context_enc), []).append(i)
            else:
                plain.append(i)
        groups = [members for members in by_context.values() if len(members) > 1]
        plain += [members[0] for members in by_context.values() if len(members) == 1]
        return plain, groups

    def _score_shared_context(self, context_enc: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Run the context once, then every continuation on a copy of its KV cache."""
        decoder = self.model.get_decoder()
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            prefix = decoder(input_ids=torch.tensor([context_enc], device=self.device), use_cache=True)
            last = prefix.last_hidden_state[0, -1]
            tails = [c[:-1] for c in continuations]
            width = max(len(t) for t in tails)
            hidden_rows = [[last] for _ in continuations]
            if width:
                ids = torch.zeros((len(tails), width), dtype=torch.long)
                for row, tail in enumerate(tails):
                    ids[row, :len(tail)] = torch.tensor(tail, dtype=torch.long)
                cache = prefix.cache
                cache.batch_repeat_interleave(len(tails))
                hidden = decoder(input_ids=ids.to(self.device), cache=cache, use_cache=True).last_hidden_state
                for row, tail in enumerate(tails):
                    hidden_rows[row].extend(hidden[row, :len(tail)])
            logits = output_logits(self.model, torch.stack([h for rows in hidden_rows for h in rows]))
        return _answers(logits, continuations)

    def _score_batch(self, batch: list[Request]) -> list[tuple[float, bool]]:
        inputs, spans, targets = [], [], []
        for _, context_enc, continuation_enc in batch:
            if not context_enc or not continuation_enc:
                raise ValueError("lm-eval request with an empty context or continuation")
            # Same window as HFLM: truncate from the left, drop the last token.
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
            n_cont = len(continuation_enc)
            inputs.append(tokens)
            spans.append((len(tokens) - n_cont, len(tokens)))
            targets.append(continuation_enc)
        width = max(len(t) for t in inputs)
        # Right padding with no attention mask, as HFLM does: causal attention keeps the
        # padded tail from influencing any scored position.
        ids = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, :len(tokens)] = torch.tensor(tokens)
        rows = torch.cat([torch.full((e - s,), r) for r, (s, e) in enumerate(spans)])
        cols = torch.cat([torch.arange(s, e) for s, e in spans])
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            hidden = self.model.get_decoder()(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
            logits = output_logits(self.model, hidden[rows.to(self.device), cols.to(self.device)])
        return _answers(logits, targets)


def _answers(logits: torch.Tensor, targets: list[list[int]]) -> list[tuple[float, bool]]:
    """(sum of target log-probs, all targets greedy) per request, from the stacked scored logits."""
    target = torch.tensor([tok for t in targets for tok in t], device=logits.device)
    logprobs = F.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
    greedy = logprobs.argmax(dim=-1) == target
    answers, offset = [], 0
    for t in targets:
        n = len(t)
        answers.append((float(token_lp[offset:offset + n].sum()), bool(greedy[offset:offset + n].all())))
        offset += n
    return answers
