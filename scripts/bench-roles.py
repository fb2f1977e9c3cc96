#!/usr/bin/env python3
"""Where each heartbeat's CPU goes, by program and by PostgreSQL role, per bench step.

The bench reports CPU per program (silverguard, every postgres process, mosquitto, itself).
This splits PostgreSQL further: each postgres process's CPU is labelled with its
backend_type (autovacuum worker, checkpointer, walwriter, ...) or, for a client backend,
with the statement it was most often seen running (heartbeat COPY, the silence sweep, the
bench's lag poller, ...), sampled from pg_stat_activity four times a second. It is a
diagnostic: a backend's whole CPU in an interval goes to its most frequent statement.

  sample OUT DONEFILE   every 2 s, one JSON line per interval to OUT, until DONEFILE exists
                        (PGPORT, default 5442: the bench's own cluster)
  report LOG SAMPLES    per step of a bench log whose lines start with a Unix time,
                        microseconds per committed heartbeat, by program and by role

Only the processes of the cluster on PGPORT count as PostgreSQL (its postmaster and the
pids pg_stat_activity shows, the sampler's own backend excepted): other clusters on the
machine are left out. The bench's lag poller runs in that cluster, so it is listed as a role
of its own. docs/performance.md ("eighth round") shows how the bench's output is
time-stamped for `report`. psycopg2 is installed with pip when missing.
"""
import collections
import json
import os
import re
import sys
import time

from pip_ensure import ensure

PROGRAMS = ("postgres", "mosquitto", "silverguard", "bracelet-sim")
# Statement prefixes (or words near the start) and the role they name.
STATEMENTS = [
    ("COPY heartbeats", "heartbeat COPY"),
    ("WITH due AS", "silence sweep"),
    ("SELECT m.i FROM unnest", "bench lag poller"),
    ("INSERT INTO device_latest", "device_latest flush"),
    ("DELETE FROM silence_rechecks", "interval recheck"),
    ("SELECT a.subject", "silence recovery"),
    ("COMMIT", "commit"),
]


def process_ticks():
    """CPU ticks of every process of the programs above, by pid."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if comm not in PROGRAMS:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(pid)] = (comm, int(fields[11]) + int(fields[12]))
    return out


def statement_role(query):
    q = (query or "").strip().replace("\n", " ")
    for prefix, role in STATEMENTS:
        if prefix in q[:80]:
            return role
    return "other: " + q[:30]


def connect(port, done_path):
    """The cluster, waited for (the sampler may start before the bench's cluster is up)."""
    import psycopg2

    while True:
        try:
            conn = psycopg2.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=5
            )
            conn.autocommit = True
            return conn
        except psycopg2.OperationalError:
            if os.path.exists(done_path):
                sys.exit("bench-roles: the cluster on port %d never answered" % port)
            time.sleep(1)


def sample(out_path, done_path):
    ensure("psycopg2", "psycopg2-binary")
    port = int(os.environ.get("PGPORT", "5442"))
    cur = connect(port, done_path).cursor()
    cur.execute("SELECT pg_backend_pid(), current_setting('data_directory')")
    me, data_dir = cur.fetchone()
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    tick = os.sysconf("SC_CLK_TCK")
    prev, prev_t = process_ticks(), time.time()
    with open(out_path, "w") as out:
        while not os.path.exists(done_path):
            seen = collections.defaultdict(collections.Counter)
            backend_type = {postmaster: "postmaster"}
            end = prev_t + 2.0
            while time.time() < end:
                cur.execute(
                    "SELECT pid, backend_type, state, query FROM pg_stat_activity WHERE pid <> %s",
                    (me,),
                )
                for pid, btype, state, query in cur.fetchall():
                    backend_type[pid] = btype
                    if btype == "client backend":
                        role = statement_role(query)
                        seen[pid][role if state == "active" else "idle after " + role] += 1
                time.sleep(0.25)
            now, t = process_ticks(), time.time()
            per_role = collections.Counter()
            for pid, (comm, ticks) in now.items():
                # A process born inside the interval: all its CPU is from the interval.
                used = ticks - prev[pid][1] if pid in prev else ticks
                if used <= 0:
                    continue
                if comm != "postgres":
                    per_role[comm] += used
                elif pid not in backend_type:
                    continue  # another cluster's, or the sampler's own backend
                elif backend_type.get(pid) == "client backend":
                    counts = seen[pid]
                    active = {k: v for k, v in counts.items() if not k.startswith("idle")}
                    pick = active or counts
                    per_role["postgres: " + (max(pick, key=pick.get) if pick else "client")] += used
                else:
                    per_role["postgres: " + backend_type[pid]] += used
            dt = t - prev_t
            cpu = {k: v / tick / dt * 100 for k, v in sorted(per_role.items())}
            out.write(json.dumps({"from": prev_t, "t": t, "cpu_percent": cpu}) + "\n")
            out.flush()
            prev, prev_t = now, t


def report(log_path, samples_path):
    steps, started, window_end = [], None, None
    for line in open(log_path, encoding="utf-8", errors="replace"):
        stamp, _, msg = line.partition(" ")
        try:
            t = float(stamp)
        except ValueError:
            continue
        # "step 2/9 load: …", "refine 1/3 load: …", or "load: …" when the run has one step.
        m = re.search(r"(?:(step|refine) (\d+)/\d+ )?load: (\d+) hb/s.*warm-up (\d+)s", msg)
        if m:
            name = f"{m.group(1)} {m.group(2)}" if m.group(1) else "step 1"
            started = (name, int(m.group(3)), t + int(m.group(4)))
            window_end = None
        # The measured window's progress lines; a lossy step's drain comes after them.
        if started and "[window" in msg:
            window_end = t
        m = re.search(r"done: offered \d+/s, committed (\d+)/s.*lost (\d+)", msg)
        if m and started:
            steps.append(started + (window_end or t, int(m.group(1)), int(m.group(2))))
            started = None
    rows = []
    for line in open(samples_path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line the sampler was still writing
    print("step        offered committed    lost | µs per committed heartbeat: "
          "silverguard postgres mosquitto bench | postgres by role")
    for name, offered, t0, t1, committed, lost in steps:
        # Samples wholly inside the measured window.
        window = [r for r in rows if t0 <= r.get("from", r["t"] - 2) and r["t"] <= t1]
        if not window or committed == 0:
            print(f"{name:10} {offered:8} {committed:9} {lost:7} | no samples inside the window")
            continue
        mean = collections.Counter()
        for r in window:
            for k, v in r["cpu_percent"].items():
                mean[k] += v / len(window)

        def us(percent):
            return percent / 100 / committed * 1e6

        pg = sum(v for k, v in mean.items() if k.startswith("postgres"))
        roles = sorted(
            ((k[len("postgres: "):], us(v)) for k, v in mean.items() if k.startswith("postgres")),
            key=lambda kv: -kv[1],
        )
        print(
            f"{name:10} {offered:8} {committed:9} {lost:7} | "
            f"{us(mean['silverguard']):11.1f} {us(pg):8.1f} {us(mean['mosquitto']):9.1f} "
            f"{us(mean['bracelet-sim']):5.1f} | "
            + ", ".join(f"{k} {v:.1f}" for k, v in roles if v >= 0.3)
        )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "sample":
        sample(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
