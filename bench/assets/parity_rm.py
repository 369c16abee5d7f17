"""A toy reward for benchmarks on random-weight models: 1 when the last response token id is even.

Random models almost never answer arithmetic, so a math reward would give all-zero groups; this
one gives groups with varied rewards, so every step has a non-zero policy gradient.
"""


async def reward(args, sample):
    return float(sample.tokens[-1] % 2 == 0)
