"""The OpenAI-compatible judge: one ``/chat/completions`` request per answer, scored from the top logprobs."""
from __future__ import annotations

import logging
import math
import os
import random
import re
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

from .base import MIN_MASS, Judge, JudgeError, JudgeScore, redact, score_from_distribution, score_from_text

log = logging.getLogger(__name__)


class _BrokenReply(Exception):
    """A 200 reply that cannot be read as a judgement (no choices, a NaN logprob, ...)."""


class APIJudge(Judge):
    """An OpenAI-compatible ``/chat/completions`` judge (``logprobs=True, top_logprobs=20, max_tokens=1,
    temperature=0``).

    The API key is read from the environment variable *named* ``api_key_env`` at each request; it is
    never an argument, never stored on the object, and never logged or cached. Requests that fail with
    429, 5xx, a timeout or a dropped connection are retried ``max_retries`` times with exponential backoff
    (``backoff * 2**attempt`` seconds, at most ``max_backoff``, or the server's Retry-After). When the
    provider returns no logprobs (or rejects the parameter), the judge switches to text mode for good:
    it asks for up to ``text_tokens`` tokens and parses the number (``parsed=True`` in the results).

    ``deadline``: seconds one request may take in all (attempts, timeouts and waits); a server that never
    answers fails with a message naming it after that long, and every timeout on the way is logged as a
    warning (None: no deadline). Replies that cannot be read (no ``choices``, a NaN logprob, no number)
    give ``label=None``; :func:`judge_answers` asks again and never caches them. The reasons are counted
    in ``problems``. Every error text passes through :func:`redact` (no key, no bearer token).
    """

    batch_size = 32

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str = "OPENAI_API_KEY",
                 rubrics: Mapping[str, str] | None = None, *, timeout: float = 60.0, max_retries: int = 6,
                 backoff: float = 1.0, max_backoff: float = 60.0, max_workers: int = 8, top_logprobs: int = 20,
                 text_tokens: int = 8, min_mass: float = MIN_MASS, deadline: float | None = 300.0):
        super().__init__(rubrics)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", api_key_env or ""):
            raise ValueError("api_key_env is the NAME of an environment variable holding the key (e.g. "
                             "'OPENAI_API_KEY'), not the key itself.")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.max_workers, self.top_logprobs, self.text_tokens = max_workers, top_logprobs, text_tokens
        self.min_mass = min_mass
        self.deadline = deadline
        self.text_mode = False  # set once the provider shows it has no logprobs
        self.n_requests = 0
        self.problems: Counter = Counter()  # why replies gave no usable judgement
        self._local = threading.local()
        self._count_lock = threading.Lock()
        mm = "" if min_mass == MIN_MASS else f"|min_mass={min_mass}"
        self.judge_id = f"api:{model}@{self.base_url}{mm}"

    def __repr__(self) -> str:
        return f"APIJudge(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_local", None)
        state.pop("_count_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()
        self._count_lock = threading.Lock()

    def _session(self):
        import requests

        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _redact(self, text: object) -> str:
        """``text`` without the configured key (read from the environment now), bearer tokens, sk-... keys."""
        return redact(text, [os.environ.get(self.api_key_env)])

    def _problem(self, why: str, parsed: bool = False) -> JudgeScore:
        with self._count_lock:
            self.problems[why] += 1
        return JudgeScore(None, None, 0.0, parsed)

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env)
        if key is None:
            raise JudgeError(f"The API judge reads its key from the environment variable {self.api_key_env}, "
                             "which is not set: export it (any value for a local server without keys).")
        return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def _post(self, body: dict) -> dict:
        """POST with bounded retries within ``deadline``; returns the JSON reply. Raises JudgeError (every
        message redacted)."""
        import requests

        url = f"{self.base_url}/chat/completions"
        last, silent = "no attempt", True  # silent: the server never answered at all
        t0 = time.monotonic()
        attempts = 0
        for attempt in range(self.max_retries + 1):
            left = None if self.deadline is None else self.deadline - (time.monotonic() - t0)
            if left is not None and left <= 0:
                break
            wait = min(self.max_backoff, self.backoff * 2 ** attempt) * (1 + 0.25 * random.random())
            timeout = self.timeout if left is None else max(0.05, min(self.timeout, left))
            retry_level = logging.INFO
            try:
                with self._count_lock:
                    self.n_requests += 1
                attempts += 1
                r = self._session().post(url, json=body, headers=self._headers(), timeout=timeout)
            except (requests.Timeout, requests.ConnectionError) as e:
                last = f"{type(e).__name__} after {time.monotonic() - t0:.0f} s"
                retry_level = logging.WARNING  # a server that does not answer: say so at once
            except requests.RequestException as e:  # e.g. a key with a line break in it (InvalidHeader)
                raise JudgeError(self._redact(
                    f"The request to the judge API at {self.base_url} could not be sent ({type(e).__name__}: "
                    f"{e}). Check the key in ${self.api_key_env} (no spaces or line breaks) and the base URL."
                ).replace("\n", " ")) from None
            else:
                silent = False
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        last = "a reply that is not JSON"
                elif r.status_code == 429 or r.status_code >= 500:
                    body_text = " ".join(r.text[:200].split())
                    last = f"HTTP {r.status_code}" + (f" {body_text!r}" if body_text else "")
                    ra = r.headers.get("Retry-After")
                    if ra:
                        try:
                            wait = min(self.max_backoff, max(0.0, float(ra)))
                        except ValueError:
                            pass
                else:
                    raise _HTTPError(r.status_code, self._redact(r.text[:300]))
            if attempt < self.max_retries:
                if self.deadline is not None:
                    left = self.deadline - (time.monotonic() - t0)
                    if left <= 0:
                        break
                    wait = min(wait, left)
                log.log(retry_level, "%s", self._redact(
                    f"judge server {self.base_url}: {last}; retry {attempt + 1}/{self.max_retries} in {wait:.1f} s"
                    + (f" (gives up {self.deadline:g} s after the first attempt)" if self.deadline is not None else "")))
                time.sleep(wait)
        took = time.monotonic() - t0
        if self.deadline is not None and took >= self.deadline - 1e-3:
            what = "did not answer" if silent else "gave no usable reply"
            raise JudgeError(self._redact(
                f"The judge server at {self.base_url} {what} within the {self.deadline:g} s deadline ({attempts} "
                f"attempt(s), last: {last}): check that it is running and reachable, or raise APIJudge(deadline=...)."))
        raise JudgeError(self._redact(
            f"The judge API at {self.base_url} failed {attempts} times (last: {last}). Check the server, or "
            "raise max_retries / backoff."))

    def _body(self, prompt: str, logprobs: bool) -> dict:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "seed": 0}
        if logprobs:
            body.update(max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs)
        else:
            body.update(max_tokens=self.text_tokens)
        return body

    @staticmethod
    def _top_logprobs(reply: dict) -> dict[str, float] | None:
        """The first token's top logprobs as probabilities; None when the reply has no logprobs.
        Raises _BrokenReply for a reply without choices or with an unreadable / NaN logprob."""
        try:
            choice = reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise _BrokenReply("a reply without choices") from None
        try:
            content = choice["logprobs"]["content"]
            top = content[0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            return None
        if not top:
            return None
        probs: dict[str, float] = {}
        try:
            for e in top:
                lp = float(e["logprob"])
                if math.isnan(lp) or lp > 0:
                    raise _BrokenReply("a NaN or positive logprob")
                probs[str(e["token"])] = probs.get(str(e["token"]), 0.0) + math.exp(lp)
        except (KeyError, TypeError, ValueError):
            raise _BrokenReply("an unreadable logprob entry") from None
        return probs

    @staticmethod
    def _text(reply: dict) -> str:
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            return ""

    def score(self, kind: str, question: str, answer: str) -> JudgeScore:
        prompt, specials = self.prompt(kind, question, answer), self.specials(kind)
        if not self.text_mode:
            try:
                reply = self._post(self._body(prompt, logprobs=True))
            except _HTTPError as e:
                if e.status == 400 and "logprob" in e.text.lower():
                    self._switch_to_text("the provider rejects the logprobs parameter")
                else:
                    raise JudgeError(self._redact(e.describe(self.api_key_env, self.base_url))) from None
            else:
                try:
                    probs = self._top_logprobs(reply)
                except _BrokenReply as e:
                    return self._problem(str(e))
                if probs is not None:
                    sc = score_from_distribution(probs, specials, self.min_mass)
                    if sc.label is None:
                        self._problem(f"less than {self.min_mass:g} probability on the number tokens")
                    return sc
                self._switch_to_text("the provider returned no logprobs")
        try:
            reply = self._post(self._body(prompt, logprobs=False))
        except _HTTPError as e:
            raise JudgeError(self._redact(e.describe(self.api_key_env, self.base_url))) from None
        if not isinstance(reply, dict) or not reply.get("choices"):
            return self._problem("a reply without choices", parsed=True)
        sc = score_from_text(self._text(reply), specials)
        if sc.label is None:
            self._problem("no number in the text reply")
        return sc

    def _switch_to_text(self, why: str) -> None:
        if not self.text_mode:
            warnings.warn(f"{why}: the API judge parses numbers from text from now on (parsed=True).",
                          stacklevel=3)
        self.text_mode = True

    def score_many(self, kind: str, pairs: Sequence[tuple[str, str]]) -> list[JudgeScore]:
        if len(pairs) <= 1 or self.max_workers <= 1:
            return [self.score(kind, q, a) for q, a in pairs]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(pairs))) as ex:
            return list(ex.map(lambda qa: self.score(kind, *qa), pairs))


class _HTTPError(Exception):
    """A 4xx reply; ``text`` is the start of its body, already redacted by the caller."""

    def __init__(self, status: int, text: str):
        super().__init__(status)
        self.status, self.text = status, text

    def describe(self, env: str, base_url: str = "") -> str:
        hint = f" Check the key in ${env}." if self.status in (401, 403) else ""
        where = f" at {base_url}" if base_url else ""
        body = " ".join(self.text.split())
        return f"The judge API{where} answered HTTP {self.status}: {body!r}.{hint}"
