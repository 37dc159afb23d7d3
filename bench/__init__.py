"""The WireTAP benchmark (bench/run.py): throughput, latency, loss and cost of the real server."""
