import sys, statistics, collections
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    k, *v = line.split()
    if v: d[k].append(float(v[0]))
for k, v in d.items(): print(f"{k:24s} {statistics.median(v):.3f}  rounds {v}")
