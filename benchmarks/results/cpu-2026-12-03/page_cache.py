import numpy as np, os, time, tempfile, shutil, sys
a = np.random.default_rng(0).standard_normal((8192, 1024)).astype(np.float16)  # one 16 MB chunk file
mv = memoryview(a).cast("B")
dirs = []
for mode in sys.argv[1].split(","):
    d = tempfile.mkdtemp(dir="/var/tmp"); dirs.append(d)
    n = 96  # 1.6 GB per mode
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fd = os.open(f"{d}/c{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, mv)
        os.fsync(fd)
        if mode == "dontneed":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t1, c1 = time.perf_counter(), time.process_time()
    print(mode, "wall %.2f s, writer cpu %.1f ms per 10.5 MB" % (t1 - t0, (c1 - c0) * 1e3 / (n * 16.8) * 10.5), flush=True)
for d in dirs:
    shutil.rmtree(d)
