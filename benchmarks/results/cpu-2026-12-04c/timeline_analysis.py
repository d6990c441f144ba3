"""Reads the timeline that timeline_instrumentation.diff makes a writer process log (the largest file in
/tmp/tl: the timed run's writer process) and prints, over the steady span (first and last chunk left out):
the share of time during which at least one chunk's rows were being written, the span per chunk, one chunk's
write time and its statistics time (median)."""
import glob
import os
import statistics


def main():
    log = max(glob.glob("/tmp/tl/*"), key=os.path.getsize)
    events = sorted((line.split() for line in open(log) if line[:1].isdigit()), key=lambda e: float(e[0]))
    started, writes, committing, stats = {}, [], {}, []
    for stamp, _thread, kind, chunk in events:
        if kind == "io_start":
            started[chunk] = float(stamp)
        elif kind == "io_end":
            writes.append((started.pop(chunk), float(stamp)))
        elif kind == "commit":
            committing[chunk] = float(stamp)
        elif kind == "stats" and chunk in committing:
            stats.append(float(stamp) - committing[chunk])
    writes = sorted(writes)[1:-1]
    begin, end = writes[0][0], max(stop for _, stop in writes)
    busy, (low, high) = 0.0, writes[0]
    for start, stop in writes[1:]:
        if start > high:
            busy, low, high = busy + high - low, start, stop
        else:
            high = max(high, stop)
    busy += high - low
    print(f"chunks {len(writes)}: disk busy {busy / (end - begin):.2f} of {1e3 * (end - begin) / len(writes):.1f} "
          f"ms per chunk; io per chunk median {1e3 * statistics.median(b - a for a, b in writes):.1f} ms; "
          f"stats median {1e3 * statistics.median(stats):.1f} ms")


if __name__ == "__main__":
    main()
