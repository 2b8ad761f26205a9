"""README's first command: snapshot the bundled tiny model's server, restore it, and show
cold start vs restore time to first token. One run each; see cold_vs_restore.py for medians.

    ./run.sh demo [--keep]      (--keep: leave the snapshot and the restored server running)
"""

from __future__ import annotations

import argparse
import shutil
import time

from harness import run, SNAPSHOTS, bundled_model, fastvllm, stop_all

SERVER_ARGS = ["--enforce-eager"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the snapshot and leave the server running")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    model = bundled_model("tiny")
    out = SNAPSHOTS / f"demo-tiny-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"1/2 snapshot: cold-starting vLLM on {model.name}, warming it, dumping it with CRIU ...", flush=True)
    snap, _ = fastvllm("snapshot", str(model), "--out", str(out), "--port", str(args.port), "--", *SERVER_ARGS)
    print("2/2 restore: bringing the server back from the snapshot ...", flush=True)
    try:
        rest, _ = fastvllm("restore", str(out))
    finally:
        if not args.keep:
            stop_all()
            shutil.rmtree(out, ignore_errors=True)
    cold, warm = snap["timings"]["first_token_s"], rest["timings"]["first_token_s"]
    t = rest["timings"]
    rows = [
        ("cold start -> first token", f"{cold:6.2f} s", "vLLM process start, load, warm-up request"),
        (f"CRIU dump (after level-{snap['level']} sleep)", f"{snap['timings']['dump_s']:6.2f} s",
         f"{snap['image_bytes'] / 2**30:.2f} GiB of images ("
         + {1: "no KV cache", 2: "no weights, no KV cache"}.get(snap["level"], "whole process") + ")"),
        ("restore -> first token", f"{warm:6.2f} s",
         f"CRIU restore {t['restore_s']:.2f} s ({rest['memory']['engine']} memory), "
         f"ready to serve {t.get('weights_s', t['healthy_s']):.2f} s, canary identical"),
        ("speed-up", f"{cold / warm:6.1f} x", "one run each; ./run.sh bench for medians"),
    ]
    print()
    for name, value, note in rows:
        print(f"  {name:<30} {value:>9}   {note}")
    if args.keep:
        print(f"\nsnapshot kept at {out}; server running at {rest['endpoint']} (fastvllm stop --all)")


if __name__ == "__main__":
    run(main)
