"""Speculative decoding with no draft model: prompt-lookup (n-gram) drafting and exact verification
(pure Python, no torch).

Drafting. Voice replies repeat names, numbers and phrases from the persona and the conversation, so the tokens
that followed the latest earlier occurrence of a sequence's last n tokens (n = max_n .. min_n, longest first)
are a cheap guess of what comes next. `NgramIndex` keeps, per n, the latest position of every n-gram that has a
follower, updated incrementally as tokens are appended, so a lookup costs O(max_n) per step whatever the length.

Verification (the runner samples, `accept` decides). A decode step with drafts d1..dk feeds [last, d1..dk] at
positions p..p+k in one forward pass and samples one token s_j per row exactly as plain decoding samples
(greedy: argmax; otherwise temperature / top-k / top-p): s_j is the target's token for position p+j+1 given
that d1..dj are right. Emit s_0..s_a, where a is the number of leading rows with s_j == d_{j+1}: the accepted
drafts (equal to what the target sampled) and then the first differing sample, or the bonus row s_k.

Why this is exact. Greedy: every emitted token is the target's argmax given the emitted prefix. Sampled: a
prompt-lookup draft is a point mass q = δ_d, for which the standard speculative-sampling rule accepts d with
probability min(1, p(d)/q(d)) = p(d) and on rejection draws from norm(max(0, p - q)) = p restricted to x != d.
"Draw x ~ p, accept iff x == d, else emit x" has the same law: P(d) = p(d), P(x | reject) = p(x) / (1 - p(d)).
So every emitted token is distributed as plain sampling would draw it (tests/test_spec_decode.py checks this
statistically).

Policy (`SpecPolicy`): draft only when a match exists; draft length adapts per sequence (after a verify that
accepted a drafts, the next draft holds at most a + 2 tokens, never more than `num_tokens`); a sequence whose
drafts keep failing backs off (skips 2, 4, ... up to `max_backoff_steps` steps), so the cost when nothing is ever
accepted is bounded to one verify every `max_backoff_steps` steps."""

from __future__ import annotations

from dataclasses import dataclass


class NgramIndex:
    """Latest earlier occurrence of each n-gram (min_n <= n <= max_n) of one token list that has a follower."""

    __slots__ = ("min_n", "max_n", "_last", "_n_indexed")

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._last: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_n + 1)]  # [n] gram -> end index
        self._n_indexed = 0  # tokens[:_n_indexed] have had their (follower-having) n-grams indexed

    def update(self, tokens: list[int]) -> None:
        """Index the n-grams that gained a follower since the last call (tokens only ever grow)."""
        for end in range(max(self._n_indexed, 1) - 1, len(tokens) - 1):  # n-grams ending at `end` have end + 1
            for n in range(self.min_n, self.max_n + 1):
                if end + 1 >= n:
                    self._last[n][tuple(tokens[end + 1 - n:end + 1])] = end
        self._n_indexed = max(self._n_indexed, len(tokens))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
        self.update(tokens)
        L = len(tokens)
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            end = self._last[n].get(tuple(tokens[L - n:]))
            if end is not None:
                return tokens[end + 1:min(end + 1 + k, L)]
        return []


def accept(drafts: list[int], sampled: list[int]) -> list[int]:
    """sampled[j] is the target's token after the input's row j ([last, d1..dk]); returns the tokens to emit:
    the drafts the target agrees with, then its own next token (len(sampled) == len(drafts) + 1)."""
    if len(sampled) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} sampled tokens, got {len(sampled)}")
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return sampled[:a + 1]


@dataclass(slots=True)
class SpecState:
    """Per-sequence drafting state (kept on the Sequence, owned by SpecPolicy)."""
    index: NgramIndex
    max_next: int  # draft at most this many tokens next time (adapts to the last acceptance)
    fails: int = 0  # consecutive verifies that accepted nothing
    skip: int = 0  # decode steps left before drafting again (back-off)
    num_drafted: int = 0  # cumulative, for stats
    num_accepted: int = 0
    num_verifies: int = 0


class SpecPolicy:
    """Who drafts, how much, and the bookkeeping after each verify."""

    def __init__(self, num_tokens: int, min_n: int = 2, max_n: int = 4, max_backoff_steps: int = 16):
        if num_tokens < 1 or not 1 <= min_n <= max_n or max_backoff_steps < 1:
            raise ValueError(f"bad speculative settings: num_tokens={num_tokens}, n-gram {min_n}..{max_n}, "
                             f"max_backoff_steps={max_backoff_steps}")
        self.num_tokens = num_tokens
        self.min_n, self.max_n = min_n, max_n
        self.max_backoff_steps = max_backoff_steps
        self.num_drafted = 0  # engine-wide cumulative counters
        self.num_accepted = 0
        self.num_verifies = 0

    def state(self, seq) -> SpecState:
        st = seq.spec
        if st is None:
            st = seq.spec = SpecState(NgramIndex(self.min_n, self.max_n), self.num_tokens)
        return st

    def propose(self, seq, limit: int) -> list[int]:
        """Drafts for a decoding sequence (at most `limit`), or [] (no match, backing off, or disabled)."""
        if limit <= 0 or not seq.params.speculate:
            return []
        st = self.state(seq)
        if st.skip > 0:
            st.skip -= 1
            return []
        return st.index.propose(seq.token_ids, min(limit, st.max_next))

    def record(self, seq, num_drafted: int, num_accepted: int) -> None:
        """After a verify of num_drafted drafts of which num_accepted were right."""
        st = self.state(seq)
        st.num_drafted += num_drafted
        st.num_accepted += num_accepted
        st.num_verifies += 1
        self.num_drafted += num_drafted
        self.num_accepted += num_accepted
        self.num_verifies += 1
        st.max_next = min(self.num_tokens, num_accepted + 2)
        if num_accepted == 0:
            st.fails += 1
            st.skip = min(self.max_backoff_steps, 2 ** st.fails) - 1 if st.fails > 1 else 0
        else:
            st.fails = 0
