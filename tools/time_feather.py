"""Time the paste-back feather on a 6000 x 4000 photo: one dilation per pixel of radius (the feather's definition,
how bgjax computed it before) against one Chebyshev distance transform (`bgjax.sampling.host.feather`), and check
that they agree bit for bit.

    python tools/time_feather.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bgjax.data.augment import dilate
from bgjax.sampling.host import FEATHER_FRACTION, feather


def by_dilations(mask: np.ndarray, radius: int) -> np.ndarray:
    """The feather's definition (tests/test_host.py checks `feather` against it): the mean of the mask dilated
    by 0 .. radius px, one dilation per pixel of radius."""
    total, grown = mask.astype(np.float32), mask
    for _ in range(radius):
        grown = dilate(grown, 1)
        total += grown
    return total / np.float32(radius + 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    height, width = 4000, 6000
    yy, xx = np.mgrid[:height, :width]
    # An elliptic product covering 27% of the photo; the default radius, 1% of the longer side.
    mask = ((yy - height / 2) / (0.35 * height)) ** 2 + ((xx - width / 2) / (0.25 * width)) ** 2 <= 1
    radius = max(1, round(FEATHER_FRACTION * max(height, width)))
    results = {}
    for name, fn in (("dilations", by_dilations), ("distance_transform", feather)):
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            results[name] = fn(mask, radius)
            times.append(time.perf_counter() - start)
        print(json.dumps({"feather": name, "photo": f"{width}x{height}", "radius": radius,
                          "seconds": [round(t, 3) for t in times]}))
    print(json.dumps({"bit_equal": bool(np.array_equal(results["dilations"], results["distance_transform"]))}))


if __name__ == "__main__":
    main()
