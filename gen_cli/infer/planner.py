"""How many guesses a speculative round makes: the K whose expected tokens per second, from the acceptance
measured so far at each guess position and the measured cost of a target forward over K+1 rows, beats a plain
step's. Plain arithmetic on what `infer.speculative` measures; nothing here runs a model."""

from __future__ import annotations

from collections import deque


class Planner:
    """Picks each round's K from what was measured: the K whose expected tokens per second (acceptance so far
    at each guess position ÷ the measured verify time for K+1 rows, plus K proposer guesses) beats a plain
    step's; when none does, plain steps, re-probing now and then (after 4, 8, … 64 held rounds)."""

    ALPHA = 0.3  # weight of the newest proposer time in its moving average
    RATE_ALPHA = 0.1  # weight of the newest round in an acceptance rate, after the first ten
    PRIOR = 0.6  # acceptance assumed at a guess position not yet tried: hopeful, so K grows to be measured

    KEEP = 9  # readings per row count whose median is its cost
    SURE = 2  # readings before a cost is taken as read, even if dearer than the trend below it

    def __init__(self, readings: dict[int, deque[float]], max_k: int) -> None:
        self.readings = readings  # rows -> latest seconds of a target forward over them (1: a plain step)
        self.costs = {n: sorted(r)[(len(r) - 1) // 2] for n, r in readings.items()}
        self.max_k = max_k
        self.rate = [self.PRIOR] * max_k  # P(guess i kept | guesses before it kept)
        self.tried = [0] * max_k
        self.guess_s = 0.0  # the proposer's seconds per guess
        self.held = 0  # plain rounds since the last proposal
        self.wait = 4  # held rounds before the next probe
        self.probes = 0
        self.warm: set[int] = set()  # widths run at least once in this run

    def _table(self, widest: int) -> list[float]:
        """Seconds of a forward over 0..widest rows as the planner counts them: more rows never cost less, so
        a figure is bounded by the cheapest one measured at or above it (one reading inflated by another
        process is overruled by its neighbours); not measured yet: the line through the two counts below it,
        hopeful enough that it gets tried and measured, not so hopeful that every wider K is tried."""
        table = [0.0] * (widest + 1)
        cheapest = float("inf")
        for n in sorted(self.costs, reverse=True):
            cheapest = min(cheapest, self.costs[n])
            if n <= widest:
                table[n] = cheapest
        for n in range(1, widest + 1):
            # The line through the two counts below (two guesses: the first extra row hoped free).
            trend = table[n - 1] if n <= 2 else max(table[n - 1], 2 * table[n - 1] - table[n - 2])
            if n not in self.costs:
                table[n] = trend
            elif n > 1 and len(self.readings[n]) < self.SURE:
                # Read once: no dearer than the trend, so that one slow first reading does not bar a K for good.
                table[n] = min(table[n], trend)
        return table

    def expected(self, k: int) -> float:
        """Tokens a round with k guesses yields on average: the correction plus each guess's chance to be kept."""
        return self._expected(k)[k]

    def _expected(self, top: int) -> list[float]:
        out, total, run, rate = [1.0], 1.0, 1.0, self.PRIOR
        for i in range(top):
            rate = self.rate[i] if self.tried[i] else rate  # untried: as the position before it
            run *= rate
            total += run
            out.append(total)
        return out

    def choose(self, room: int) -> int:
        """K for the next round (0: a plain step); `room` caps it."""
        step = self.costs.get(1)
        if step is None or room < 1:
            return 0  # the first round measures a plain step
        if 0 < self.held < self.wait - 1:  # nothing verified since the last choice: it stands until the probe
            self.held += 1
            return 0
        # K grows one past the widest forward measured, not further: a forward of many rows tried on hope
        # alone can cost several steps (a kernel's cost per row is a staircase, not a line).
        top = min(self.max_k, room, max(self.costs))
        cost, tokens = self._table(top + 1), self._expected(top)
        best, best_rate = 0, 1.0 / step
        for k in range(1, top + 1):
            rate = tokens[k] / (cost[k + 1] + k * self.guess_s)
            if rate > best_rate:
                best, best_rate = k, rate
        if best:
            self.held, self.wait = 0, 4
            return best
        self.held += 1
        if self.held < self.wait:
            return 0
        self.probes += 1
        self.held, self.wait = 0, min(self.wait * 2, 64)  # a probe: one guess, to see whether guesses came back
        return 1

    def measured(self, rows: int, seconds: float) -> None:
        """One forward over `rows` rows took `seconds`."""
        # The median of the latest readings: a time slice lost to another process on a shared machine, or a
        # first call's set-up, is not the forward's cost; a minimum would favour the count read most often.
        if rows not in self.warm:
            self.warm.add(rows)
            if self.readings.get(rows):  # a run's first forward of a width pays its set-up and cold caches
                return
        latest = self.readings.setdefault(rows, deque(maxlen=self.KEEP))
        latest.append(seconds)
        self.costs[rows] = sorted(latest)[(len(latest) - 1) // 2]  # the median (the lower one of an even count)

    def verified(self, proposed: int, kept: int, proposer_s: float) -> None:
        """A round proposed `proposed` guesses (taking `proposer_s`) and the target kept the first `kept`."""
        for i in range(min(kept + 1, proposed)):
            if not self.tried[i]:  # start from what `expected` assumed for it
                self.rate[i] = self.rate[i - 1] if i else self.PRIOR
            # A running mean over the first rounds, then a slow moving one: misses come in clusters (prompt
            # lookup at a sentence's end) that a fast average would read as the guesses going bad for good.
            weight = max(self.RATE_ALPHA, 1.0 / (self.tried[i] + 2))
            self.rate[i] += weight * ((1.0 if i < kept else 0.0) - self.rate[i])
            self.tried[i] += 1
        per = proposer_s / proposed
        self.guess_s += (self.ALPHA if self.guess_s else 1.0) * (per - self.guess_s)
