"""Progress of a long loop, seen wherever the output goes: tqdm's bar on a terminal, and where
the output is a file or a pipe (a log, a batch job, CI) a plain line at a steady pace with the
count, the rate and the time left. Knows no models or datasets; loops call update().

tqdm alone cannot do the second: without a terminal it either redraws with carriage returns
(one endless line in a log) or stays silent, so the line printer below is our own."""

import sys
import time

from tqdm import tqdm

DEFAULT_INTERVAL_S = 30.0  # between progress lines without a terminal
FIRST_LINE_S = 5.0  # the first comes sooner: a user should see a run is alive within seconds
LONG_S = 600.0  # a stage estimated longer than this names the flags that shorten it


def duration(seconds):
    """'1 h 02 min', '3 min 05 s', '12 s', '0.4 s': a time a person reads at a glance."""
    if seconds != seconds or seconds == float("inf"):
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def on_terminal():
    return sys.stderr.isatty()


class Progress:
    """`update(done)` after each piece of work; a bar on a terminal, else a line to stdout when
    `interval` seconds have passed since the last (the first after FIRST_LINE_S, or at once
    with interval 0).

    what:  the words before the counts ("epoch 3/10", "IW bound")
    total: the whole amount, in `unit`s, or None where it is not known in advance (an EM fit
           that stops when it converges): then no share done and no time left are shown;
           `done` at start (a resumed epoch) counts as done
    more:  optional callable(seconds left here) -> extra words, such as the run's time left
    estimate: once the first piece is done, say how long the whole will take at its pace, and
           if that is over LONG_S, `shorter` (the flags that shorten it)"""

    def __init__(self, what, total, unit, done=0, terminal=None, interval=DEFAULT_INTERVAL_S,
                 more=None, enabled=True, estimate=False, shorter=None):
        self.what, self.total, self.unit, self.more = what, total, unit, more
        self.enabled, self.estimate, self.shorter = enabled, estimate, shorter
        self.terminal = on_terminal() if terminal is None else terminal
        self.interval, self.first = interval, min(FIRST_LINE_S, interval)
        self.start_done, self.done, self.postfix = done, done, ""
        self.start = self.last_line = time.perf_counter()
        self.lines = 0
        self.bar = None
        if enabled and self.terminal:
            self.bar = tqdm(total=total, initial=done, desc=what, unit=unit, leave=False,
                            dynamic_ncols=True)

    def rate(self):
        elapsed = time.perf_counter() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def seconds_left(self):
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 and self.total is not None else float("inf")

    def unfinished(self, done):
        return self.total is None or done < self.total

    def update(self, done, postfix=None):
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            self.done = done
            return
        first, delta, self.done = self.done == self.start_done, done - self.done, done
        if first and self.estimate and self.total is not None and done < self.total:
            self.say_estimate()
        if self.bar is not None:
            self.bar.update(delta)
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.perf_counter()
        due = self.interval if self.lines else self.first
        if now - self.last_line >= due and self.unfinished(done):
            self.print_line(now)

    def say_estimate(self):
        whole = (self.total - self.start_done) / max(self.rate(), 1e-12)
        text = (f"  {self.what}: about {duration(whole)} for {self.total} {self.unit}s at the pace "
                f"of the first {self.done - self.start_done}")
        if whole > LONG_S and self.shorter:
            text += f"; that is long: {self.shorter} make it shorter"
        self.write(text)

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def rate_words(self):
        """The pace, as units per second, or seconds per unit when that is under one a second
        (an epoch of a prior fit: "0.01 epochs/s" says less than "85 s/epoch")."""
        rate = self.rate()
        if rate >= 10:
            return f"{rate:.0f} {self.unit}s/s"
        if rate >= 1 or rate <= 0:
            return f"{rate:.2f} {self.unit}s/s"
        return f"{1 / rate:.1f} s/{self.unit}"

    def print_line(self, now):
        self.last_line, self.lines = now, self.lines + 1
        left = self.seconds_left()
        rate = self.rate_words()
        if self.total is None:
            words = [f"{self.done} {self.unit}s", rate, f"{duration(now - self.start)} so far"]
        else:
            words = [f"{self.done}/{self.total} {self.unit}s ({100 * self.done / max(1, self.total):.0f}%)",
                     rate, f"{duration(left)} left"]
        if self.postfix:
            words.append(self.postfix)
        if self.more is not None:
            words.append(self.more(left))
        print(f"  {self.what}: {', '.join(words)}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
