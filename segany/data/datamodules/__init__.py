"""Lightning datamodules: SA-1B shards, their weighted mixture, COCO / LVIS, synthetic scenes,
RITM-layout benchmarks."""
