import sys, collections, subprocess
data, pid = sys.argv[1], sys.argv[2]
out = subprocess.run(["perf","script","-i",data,"-F","pid,ip,sym,dso"],capture_output=True,text=True).stdout
CATS=[
 ("statistics: float16 decode (4 passes)", ["_aligned_contig_cast_short_to_int","INT_left_shift","INT_bitwise_and","FLOAT_multiply"]),
 ("statistics: min and max", ["FLOAT_minimum","FLOAT_maximum"]),
 ("statistics: row norms and column sums (BLAS)", ["sgemv","sdot","openblas"]),
 ("CRC32C", ["crc32c"]),
 ("slot -> chunk copy (memmove)", ["memmove","memcpy"]),
 ("page faults", ["page_fault","clear_page"]),
 ("file I/O syscalls (write, open, fsync, rename, mkdir)", ["ksys_write","iomap","dio","do_sys_open","openat","fsync","syncfs","rename","mkdir","unlink","do_filp_open","__x64_sys_close","vfs_"]),
 ("thread wakeups and switches (futex, poll, sleep)", ["futex","schedule","poll","nanosleep","select","finish_task_switch","epoll"]),
 ("socket messages", ["unix_stream","sock_","socket"]),
]
c=collections.Counter(); total=0; other=collections.Counter()
for block in out.split("\n\n"):
    lines=block.strip().splitlines()
    if not lines or lines[0].split()[0]!=pid: continue
    total+=1
    frames=[l.strip() for l in lines[1:]]
    leaf=frames[0] if frames else ""
    st=" ".join(frames)
    for name,keys in CATS:
        if any(k in leaf for k in keys) or (name.startswith(("file","thread","socket","page")) and any(k in st for k in keys)):
            c[name]+=1; break
    else:
        if "libpython" in leaf: c["Python interpreter"]+=1
        elif "_multiarray_umath" in leaf: c["other numpy"]+=1
        else: c["other"]+=1; other[leaf.split(None,1)[1][:70] if ' ' in leaf else leaf]+=1
print(f"samples {total}")
for k,v in c.most_common(): print(f"  {100*v/total:5.1f}%  {k}")
print("  other, top:", "; ".join(f"{k} {v}" for k,v in other.most_common(6)))
