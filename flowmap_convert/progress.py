"""One progress reporter for every long command: a bar on a terminal, plain log lines when piped.

On a terminal it draws a rich bar on stderr that fits 80 columns (description, count, rate, ETA). When stderr is
not a terminal (a log file, CI, `| tee`) it prints a plain line at most every `every` seconds and once at the
end, each with the total, the rate and the ETA, so a piped run is never silent for minutes:

    sample: 400/1000 images (40%), 812.3 images/s, elapsed 0:00:00, ETA 0:00:01
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    """H:MM:SS for a duration (-:--:-- when unknown)."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Count work towards `total`; `with Progress(...) as p: p.advance(n, loss=...)`.

    mode: "auto" (bar on a terminal, lines otherwise), "bar", "lines" or "off".
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        *,
        mode: str = "auto",
        every: float = 10.0,
        stream: TextIO | None = None,
        start: int = 0,
    ):
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.every = every
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.done = start
        self._start_count = start
        self.postfix: dict[str, object] = {}
        self._t0 = time.perf_counter()
        self._last_line = self._t0
        self._bar = None
        self._task = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Progress:
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            console = Console(file=self.stream, width=min(80, Console(file=self.stream).width))
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._bar.start()
            _LIVE.append(self)
            self._task = self._bar.add_task(self.desc, total=self.total, completed=self.done, rate="")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.stop()
            if self in _LIVE:
                _LIVE.remove(self)
        elif self.mode == "lines" and exc_type is None and self.done > self._start_count:
            self._emit()

    def print(self, message: str, markup: bool = False) -> None:
        """Print one line while the reporter runs: above a live bar (its line cleared first, then redrawn below),
        else as a plain line. Writing to stderr some other way while a bar is drawn leaves the bar's text in front
        of the message (`0:01:45estimated t...`). `markup`: the message is rich markup (else shown verbatim)."""
        from rich.text import Text

        text = Text.from_markup(message) if markup else Text(message)
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, soft_wrap=True)
        else:
            self.stream.write(text.plain + "\n")
            self.stream.flush()

    # ------------------------------------------------------------------ numbers
    @property
    def elapsed(self) -> float:
        """Seconds since the reporter started."""
        return time.perf_counter() - self._t0

    @property
    def rate(self) -> float:
        """Units per second of this run (work resumed from `start` does not count)."""
        el = self.elapsed
        return (self.done - self._start_count) / el if el > 0 else 0.0

    @property
    def eta(self) -> float:
        """Seconds left at the current rate (inf while unknown)."""
        r = self.rate
        return (self.total - self.done) / r if r > 0 else float("inf")

    def line(self) -> str:
        """The plain status line: desc, count/total, percent, rate, elapsed, ETA and any postfix values."""
        pct = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        r = self.rate
        rate = f"{r:.1f} {self.unit}/s" if r >= 1 or r == 0 else f"{1 / r:.2f} s/{_singular(self.unit)}"
        extra = "".join(f", {k} {_fmt(v)}" for k, v in self.postfix.items())
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, {rate}, "
            f"elapsed {format_seconds(self.elapsed)}, ETA {format_seconds(self.eta)}{extra}"
        )

    # ------------------------------------------------------------------ updates
    def advance(self, n: int = 1, **postfix) -> None:
        """Count n more units; keyword values (loss=..., grad=...) are shown beside the count."""
        self.done += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            r = self.rate
            rate = f"{r:.1f} {self.unit}/s" if r >= 1 or r == 0 else f"{1 / r:.2f} s/{_singular(self.unit)}"
            desc = self.desc + "".join(f" {k} {_fmt(v)}" for k, v in self.postfix.items())
            self._bar.update(self._task, completed=self.done, rate=rate, description=desc[:30])
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self._last_line >= self.every and self.done < self.total:
                self._emit()

    def _emit(self) -> None:
        """Write one plain line and flush (log files see it at once).

        One write call with its newline: ranks of a launch share one stderr pipe, and a line written in pieces
        (print writes the text, then the newline) can be split by another rank's line.
        """
        self._last_line = time.perf_counter()
        self.stream.write(self.line() + "\n")
        self.stream.flush()


# Bars being drawn now (innermost last): `say` prints above the innermost one.
_LIVE: list[Progress] = []


def say(message: str, markup: bool = False) -> None:
    """One line on stderr that does not collide with a live bar: above the innermost bar (its line cleared first),
    else printed plainly (rich markup rendered when `markup`)."""
    if _LIVE:
        _LIVE[-1].print(message, markup=markup)
        return
    from rich.console import Console

    Console(stderr=True).print(message, markup=markup, highlight=False, soft_wrap=True)


def _fmt(v) -> str:
    """Compact number formatting for postfix values."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _singular(unit: str) -> str:
    """`images` -> `image` for a per-unit rate (`6.59 s/probe`, not `s/probes`)."""
    return unit[:-1] if len(unit) > 2 and unit.endswith("s") and not unit.endswith("ss") else unit
