#!/bin/bash
# A/B: mmap restore of the 3B-shaped level-1 snapshot, with and without FASTVLLM_POPULATE, interleaved.
cd "$(dirname "$0")/.."
SNAP=/var/tmp/ab-3b-l1
if [ ! -f $SNAP/manifest.json ]; then
  rm -rf $SNAP
  .venv/bin/python -m fastvllm.cli snapshot /var/tmp/fastvllm-models/llama-3.2-3b --out $SNAP --level 1 --port 8601 -- --enforce-eager --max-model-len 2048 > /tmp/ab-snap.log 2>&1 || { tail -3 /tmp/ab-snap.log; exit 1; }
fi
for r in 1 2 3; do
  for pop in 0 1; do
    t0=$(date +%s.%N)
    FASTVLLM_POPULATE=$pop .venv/bin/python -m fastvllm.cli restore $SNAP --port 8602 --json > /tmp/ab-r.json 2>/tmp/ab-r.err || { tail -2 /tmp/ab-r.err; exit 1; }
    t1=$(date +%s.%N)
    .venv/bin/python - "$pop" "$t0" "$t1" <<'PY'
import json, sys, time, httpx
pop, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
d = json.load(open('/tmp/ab-r.json'))
t = d['timings']; m = d['memory']
# decode right after: 32 tokens streamed
c = httpx.Client(timeout=300)
model = c.get('http://127.0.0.1:8602/v1/models').json()['data'][0]['id']
s = time.monotonic(); first = None; n = 0
with c.stream('POST', 'http://127.0.0.1:8602/v1/completions', json={"model": model, "prompt": "Tell me a story about", "max_tokens": 32, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
    for line in r.iter_lines():
        if line.startswith('data: ') and line != 'data: [DONE]':
            n += 1
            if first is None: first = time.monotonic()
end = time.monotonic()
print(json.dumps({"populate": pop, "wall_s": round(t1 - t0, 3), "restore_s": t['restore_s'], "weights_s": t.get('weights_s'), "canary_s": t['canary_s'], "first_token_s": t['first_token_s'], "total_s": t['total_s'], "populate_rec": m.get('populate'), "decode_tok_s": round((n - 1) / (end - first), 2)}))
PY
    .venv/bin/python -m fastvllm.cli stop --all > /dev/null
    sleep 2
  done
done
