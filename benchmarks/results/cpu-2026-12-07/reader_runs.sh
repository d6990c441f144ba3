# The reader's runs of 2026-12-07, from the repository root (2 cores shared with other engineers' tests).
set -x
R=benchmarks/results/cpu-2026-12-07
uptime
python benchmarks/reader.py --seq-len 128 512 --repeats 5 --json $R/reader_warm.json > $R/reader_warm.txt 2>&1
uptime
python benchmarks/reader.py --seq-len 128 512 --repeats 5 --cold --json $R/reader_cold.json > $R/reader_cold.txt 2>&1
uptime
python benchmarks/reader.py --seq-len 512 --repeats 3 --cold --window-bytes 210000000 --json $R/reader_cold_3_windows.json > $R/reader_cold_3_windows.txt 2>&1
uptime
python benchmarks/reader.py --seq-len 512 --repeats 1 --s3 --json $R/reader_s3.json > $R/reader_s3.txt 2>&1
uptime
