#!/usr/bin/env python3
"""Reads a TensorBoard log directory with the `tensorboard` package and prints every scalar.

Usage: tools/check_tensorboard.py DIR
Prints one line per scalar tag, then `step value` lines (values with repr, so float32 rounding
shows exactly). Exits 1 when no scalar is found, so it can gate an end-to-end check of
pmp.tensorboard against the reader TensorBoard itself uses.
"""
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if not os.path.isdir(sys.argv[1]):
        sys.exit(f"not a directory: {sys.argv[1]}")
    # size_guidance 0 keeps every event instead of TensorBoard's default sampling.
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalar_tags = tags.get("scalars", [])
    for tag in scalar_tags:
        print(tag)
        for event in acc.Scalars(tag):
            print(f"  {event.step} {event.value!r}")
    # Text summaries arrive as tensors; listed so add_text can be checked by eye.
    for tag in tags.get("tensors", []):
        for event in acc.Tensors(tag):
            print(f"text {tag} {event.step} {list(event.tensor_proto.string_val)!r}")
    if not scalar_tags:
        print(f"no scalars found in {sys.argv[1]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
