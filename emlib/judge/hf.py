"""A local Hugging Face chat model as judge: exact probabilities of "0".."100", REFUSAL and CODE from one
tree-attention forward pass per batch."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..cache import model_fingerprint
from ..chat import chat_ids
from .base import MIN_MASS, SPECIAL_WORDS, Judge, JudgeScore, score_from_distribution


class HFJudge(Judge):
    """A local chat model as judge: the rubric goes through the chat template, and the probability of
    each answer string is computed from the model's own next-token distributions.

    For an integer n the judge takes the tokenizer's canonical spelling of ``str(n)`` (SmolLM2, Qwen and
    Llama-2 style tokenizers: one token per digit), multiplies the probabilities of its tokens, and
    multiplies by the probability that the next token does *not* start with a digit (so "1" is not
    counted when the model goes on to "15"). Approximation: other spellings of the same number (a
    leading space, a multi-digit token where the canonical spelling uses single digits) are not added.
    REFUSAL / CODE (where the rubric names them) get the probability of their canonical token sequence.
    All prefixes form a trie that is evaluated in one forward pass per batch with a tree attention mask
    (needs the "eager" or "sdpa" attention implementation).
    """

    batch_size = 4

    def __init__(self, model, tok, rubrics: Mapping[str, str] | None = None, *, batch_size: int = 4,
                 min_mass: float = MIN_MASS, max_length: int = 2048):
        super().__init__(rubrics)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "eager")
        if impl not in ("eager", "sdpa", None):
            raise ValueError(f"HFJudge needs attention implementation 'eager' or 'sdpa' (got {impl!r}): load "
                             "the judge model with attn_implementation='sdpa'.")
        self.model, self.tok = model, tok
        self.batch_size, self.min_mass, self.max_length = batch_size, min_mass, max_length
        mm = "" if min_mass == MIN_MASS else f"|min_mass={min_mass}"
        self.judge_id = f"hf:{getattr(getattr(model, 'emlib_info', None), 'name', 'model')}:" \
                        f"{model_fingerprint(model)}{mm}"
        self._build_trie()

    def __repr__(self) -> str:
        return f"HFJudge({self.judge_id!r})"

    def _build_trie(self) -> None:
        tok = self.tok
        cands: dict[str, list[int]] = {}
        for n in range(101):
            cands[str(n)] = list(tok.encode(str(n), add_special_tokens=False))
        for w in SPECIAL_WORDS:
            cands[w] = list(tok.encode(w, add_special_tokens=False))
        nodes: dict[tuple[int, ...], int] = {}  # prefix (len >= 1) -> node index
        parent, token, depth = [], [], []
        for ids in cands.values():
            if not ids:
                raise ValueError("The tokenizer encodes a number as no tokens: cannot use it as a judge.")
            for d in range(1, len(ids) + 1):
                pre = tuple(ids[:d])
                if pre not in nodes:
                    nodes[pre] = len(token)
                    parent.append(nodes.get(pre[:-1], -1))
                    token.append(ids[d - 1])
                    depth.append(d)
        self._cands, self._nodes = cands, nodes
        self._parent, self._token, self._depth = parent, token, depth
        vocab = len(tok)
        starts_digit = torch.zeros(vocab, dtype=torch.bool)
        for i in range(vocab):
            s = tok.decode([i])
            starts_digit[i] = bool(s) and s[0].isdigit()
        self._starts_digit = starts_digit
        n = len(token)
        anc = torch.zeros(n, n, dtype=torch.bool)  # anc[i, j]: node j is node i or an ancestor of it
        for i in range(n):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = parent[j]
        self._ancestors = anc

    def _prompt_ids(self, kind: str, question: str, answer: str) -> list[int]:
        msgs = [{"role": "user", "content": self.prompt(kind, question, answer)}]
        return chat_ids(self.tok, msgs, add_generation_prompt=True)[-self.max_length:]

    @torch.no_grad()
    def candidate_logprobs(self, prompts: list[list[int]]) -> list[dict[str, float]]:
        """log P(answer string, ended) for every candidate ("0".."100", "REFUSAL", "CODE") per prompt."""
        model = self.model
        device = next(model.parameters()).device
        n_nodes = len(self._token)
        b, p = len(prompts), max(len(x) for x in prompts)
        L = p + n_nodes
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((b, L), pad, dtype=torch.long)
        pos = torch.zeros((b, L), dtype=torch.long)
        allowed = torch.zeros((b, L, L), dtype=torch.bool)
        causal = torch.tril(torch.ones(p, p, dtype=torch.bool))
        node_tok = torch.tensor(self._token)
        node_depth = torch.tensor(self._depth)
        for i, x in enumerate(prompts):
            off = p - len(x)  # left padding
            ids[i, off:p] = torch.tensor(x)
            ids[i, p:] = node_tok
            pos[i, off:p] = torch.arange(len(x))
            pos[i, p:] = len(x) - 1 + node_depth
            real = torch.zeros(p, dtype=torch.bool)
            real[off:] = True
            allowed[i, :p, :p] = causal & real[None, :]
            allowed[i, p:, :p] = real[None, :]
            allowed[i, p:, p:] = self._ancestors
            idx = torch.arange(off)
            allowed[i, idx, idx] = True  # padding rows see themselves (no all-masked softmax rows)
        dtype = next(model.parameters()).dtype
        mask = torch.zeros((b, 1, L, L), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    logits_to_keep=n_nodes + 1, use_cache=False)
        logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()  # [b, 1 + n_nodes, vocab]
        # log P(next token does not start with a digit) after each state
        end = torch.logsumexp(logp.masked_fill(self._starts_digit[None, None, :], -math.inf), dim=-1)
        results = []
        for i in range(b):
            res = {}
            for name, cids in self._cands.items():
                lp, state = 0.0, 0  # state 0 = after the prompt, node k -> state k + 1
                for d, t in enumerate(cids):
                    lp += float(logp[i, state, t])
                    state = self._nodes[tuple(cids[:d + 1])] + 1
                if name.isdigit():
                    lp += float(end[i, state])
                res[name] = lp
            results.append(res)
        return results

    def score_many(self, kind: str, pairs: Sequence[tuple[str, str]]) -> list[JudgeScore]:
        specials = self.specials(kind)
        prompts = [self._prompt_ids(kind, q, a) for q, a in pairs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
        out: list[JudgeScore | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                lps = self.candidate_logprobs([prompts[i] for i in idx])
                for i, lp in zip(idx, lps):
                    probs = {k: math.exp(v) for k, v in lp.items() if k.isdigit() or k in specials}
                    out[i] = score_from_distribution(probs, specials, self.min_mass)
        finally:
            self.model.train(was_training)
        return out
