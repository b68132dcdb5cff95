"""Progress bar (input bytes, with docs/s and tokens/s) and periodic log lines."""
from __future__ import annotations

import sys
import time


def _rate(n: float, seconds: float) -> str:
    r = n / max(seconds, 1e-9)
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if r >= div:
            return f"{r / div:.2f}{unit}"
    return f"{r:.1f}"


class Progress:
    """``update(nbytes, docs, tokens)`` after each chunk. The bar shows on a terminal only;
    every ``log_interval`` documents a plain line is logged either way (0 turns it off)."""

    def __init__(self, total_bytes: int, log_interval: int = 1000, quiet: bool = False,
                 desc: str = "tokenizing"):
        self.start = time.perf_counter()
        self.docs = self.tokens = 0
        self.log_interval = log_interval
        self.quiet = quiet
        self._next_log = log_interval
        self.bar = None
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc, file=sys.stderr, dynamic_ncols=True, disable=None,
                            smoothing=0.1)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def rates(self) -> str:
        s = self.seconds
        return f"{_rate(self.docs, s)} docs/s, {_rate(self.tokens, s)} tokens/s"

    def log(self, msg: str, force: bool = False) -> None:
        """A line on stderr that does not break the bar; ``force`` prints even when quiet."""
        if self.quiet and not force:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(nbytes)
        if self.log_interval and self.docs >= self._next_log:
            self.log(f"processed {self.docs} documents, {self.tokens} tokens "
                     f"({self.rates()}, {self.seconds:.1f} s)")
            while self._next_log <= self.docs:
                self._next_log += self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
