import sys, time
busy = float(sys.argv[1]) / 1000.0   # seconds busy per 100 ms
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(max(0.0, 0.1 - (time.perf_counter() - t)))
