"""Interleaved A/B: 4 GB durable capture through the pipeline, two trees, same disk; child PYTHONPATH = tree only."""
import subprocess, sys, json, statistics, os
from pathlib import Path
trees={"old":"/tmp/ab_old","new":"/work/main"}
res={k:[] for k in trees}
env_extra=dict(x.split("=") for x in sys.argv[2:])
for r in range(int(sys.argv[1])):
    for name,tree in (list(trees.items()) if r%2==0 else list(reversed(trees.items()))):
        out=subprocess.run([sys.executable,str(Path(__file__).with_name("batched_sync_one.py"))],env={"PYTHONPATH":tree,"PATH":"/usr/bin:/bin",**env_extra},capture_output=True,text=True)
        line=out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
        print(name,line,flush=True)
        res[name].append(json.loads(line))
for k,v in res.items():
    mb=[x["mbps"] for x in v]; raw=[x["mbps"]/x["raw"] for x in v]
    print(k,"MB/s",[round(x) for x in mb],"median",round(statistics.median(mb)),"ratio to raw durable",[round(x,3) for x in raw],"median %.3f"%statistics.median(raw))
