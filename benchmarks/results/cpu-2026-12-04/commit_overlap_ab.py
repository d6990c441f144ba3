# A/B: the same pipeline run (pipe3.run) in a subprocess per variant, interleaved
import subprocess, sys, statistics as st, re, collections
variants={"before":"/tmp/old","after":"/work/main"}
code='''
import sys; sys.path.insert(0, "{root}")
import engine; assert engine.__file__.startswith("{root}"), engine.__file__
exec(open("/tmp/exp/pipe3.py").read().split("run(2,4)\\n")[0])
run(2,4,"{sink}",total=512e6)
for _ in range(2): run(2,4,"{sink}",total=2048e6)
'''
res=collections.defaultdict(list)
sink=sys.argv[1] if len(sys.argv)>1 else "zarr"
for r in range(int(sys.argv[2]) if len(sys.argv)>2 else 3):
    for name,root in variants.items():
        out=subprocess.run([sys.executable,"-c",code.format(root=root,sink=sink)],capture_output=True,text=True,env={"PYTHONPATH":root,"PATH":"/usr/bin:/bin"},cwd="/tmp")
        if out.returncode: print(out.stderr[-2000:]); sys.exit(1)
        lines=out.stdout.strip().splitlines()[1:]
        for l in lines:
            res[name].append(float(re.search(r"(\d+) MB/s",l).group(1)))
            print(name, l, flush=True)
for k,v in res.items(): print(k, [round(x) for x in v], "median", st.median(v))
