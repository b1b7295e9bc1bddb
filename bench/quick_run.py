"""The short, deterministic CPU run that the end-to-end tests and the fault benchmarks start from: fp32 (bitwise
reproducible), short sequences, a small slice of the corpus so that start-up is quick, wandb off, no checkpoints
unless a caller asks for them."""

FAST = [
    "device=cpu",
    "train.mixed_precision=fp32",
    "train.seq_len=64",
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.eval_every=0",
    "data.max_bytes=2000000",
    "logging.mode=disabled",
    "logging.every=1",
    "checkpoint.every=0",
    "optim.warmup_steps=2",
]
