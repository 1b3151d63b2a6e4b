#!/usr/bin/env bash
# The whole-server GPU check (issue 43), one device call of at most 600 s on an H100/H200:
# SGLang's own launch_server with this plugin, plain (--kv-policy full) then
# --kv-policy headkv --kv-budget 1024 (then, with time left, + --kv-decode-budget, and
# --kv-memory shared on shape A), at the
# same memory (--mem-fraction-static), CUDA graphs and the overlap scheduler on (SGLang's
# defaults); SGLang's own bench_serving against each, two shapes (A: long prompts, short
# answers; B: decode-heavy), a few concurrencies; /server_info polled and /metrics read
# around each run; benchmarks/server_table.py makes the table.
#
# Model: a Llama-3-8B-shaped config.json written here, --load-format dummy (random weights:
# memory and speed are real, answers are not), the test model's tokenizer (vocab_size set to
# match) and a random r2 head profile for headkv (its per-head budgets are ragged as a real
# profile's; which heads get more is random). SGLang's CUDA wheel (sgl_kernel) is not there:
# both servers run the same stand-in (headkv_sglang/_boot/compat.py write_cuda_standin) with
# SGLANG_FORCE_FUSED_OP_BACKEND=torch (RMSNorm, SiluAndMul, rotary as torch) and
# --sampling-backend pytorch, so the comparison is fair but not SGLang's top speed.
#
#   here, once:  bash scripts/gpu_bundle.sh && bash scripts/gpu_server_check.sh --prepare
#   device:      bash scripts/gpu_server_check.sh "$OUT"     (carry .whl)
#   CPU check:   DRY_RUN=1 bash scripts/gpu_server_check.sh /tmp/out   (the test model, tiny shapes)
# Knobs (env): CONC_A="4 16" CONC_B="16 48", LEN_A=16384 OUT_A=256, LEN_B=8192 OUT_B=1024,
# MEM=0.80, DECODE_BUDGET=512, DEADLINE=570 (s), PORT=30123.
# Results: $OUT/server_check_<gpu>.{md,json} (copy them to benchmarks/results/), $OUT/runs.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TOK_SRC=${TOK_SRC:-$HOME/.cache/headkv_sglang/models/SmolLM2-135M-Instruct}
if [ "${1:-}" = "--prepare" ]; then  # the tokenizer travels in .whl/tokenizer (carried, git-ignored)
  mkdir -p .whl/tokenizer
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.json merges.txt \
           generation_config.json chat_template.jinja; do
    [ -f "$TOK_SRC/$f" ] && cp "$TOK_SRC/$f" .whl/tokenizer/
  done
  python3 -c "import json; json.load(open('$TOK_SRC/config.json'))['vocab_size']" >/dev/null \
    && cp "$TOK_SRC/config.json" .whl/tokenizer/source_config.json
  ls -la .whl/tokenizer; exit 0
fi
OUT=${1:?usage: gpu_server_check.sh OUTDIR | --prepare}
mkdir -p "$OUT/runs"
DRY=${DRY_RUN:-0}
DEADLINE=${DEADLINE:-570}
PORT=${PORT:-30123}
MEM=${MEM:-0.80}
DECODE_BUDGET=${DECODE_BUDGET:-512}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1
log() { echo "[$SECONDS s] $*"; }

if [ "$DRY" = 1 ]; then  # CPU: the test model itself, the CPU compat layer, tiny shapes
  LEN_A=${LEN_A:-384} OUT_A=${OUT_A:-8} LEN_B=${LEN_B:-192} OUT_B=${OUT_B:-24}
  CONC_A=${CONC_A:-"1 2"} CONC_B=${CONC_B:-"2"}
  MODEL=$TOK_SRC; GPU=cpu_dry_run; PY=python
  SERVER_ARGS=(--max-total-tokens 16384 --sleep-on-idle)
  PROFILE_SHAPE="30 9 3 64"
else
  LEN_A=${LEN_A:-16384} OUT_A=${OUT_A:-256} LEN_B=${LEN_B:-8192} OUT_B=${OUT_B:-1024}
  CONC_A=${CONC_A:-"4 16"} CONC_B=${CONC_B:-"16 48"}
  PY=python3
  command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")} MAX_JOBS=${MAX_JOBS:-16}
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'H100|H200|A100|L40S|B200' | tr A-Z a-z)
  GPU=${GPU:-gpu}
  { nvidia-smi; $PY -c 'import torch; print("torch", torch.__version__)'; } > "$OUT/env.txt" 2>&1
  mkdir -p /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/apache_tvm_ffi-*.whl \
    && tar -xJf .whl/flashinfer_min.tar.xz -C /tmp/site || { echo "flashinfer bundle install failed"; exit 2; }
  eval "$(bash scripts/gpu_sglang_install.sh .whl/sglang /tmp/site_sgl)" || { echo "sglang bundle install failed"; exit 2; }
  # our sgl_kernel stand-in first on the path (every SGLang process imports it); the plugin's
  # entry point from a hand-written dist-info (SGLang finds plugins through importlib.metadata)
  PYTHONPATH=$REPO $PY -c "from headkv_sglang._boot.compat import write_cuda_standin; write_cuda_standin('/tmp/standin')"
  mkdir -p /tmp/site/headkv_sglang-0.1.0.dist-info
  printf 'Metadata-Version: 2.1\nName: headkv-sglang\nVersion: 0.1.0\n' > /tmp/site/headkv_sglang-0.1.0.dist-info/METADATA
  printf '[sglang.srt.plugins]\nheadkv_sglang = headkv_sglang.plugin:register\n' \
    > /tmp/site/headkv_sglang-0.1.0.dist-info/entry_points.txt
  export PYTHONPATH=/tmp/standin:/tmp/site:$PYTHONPATH:$REPO
  export SGLANG_FORCE_FUSED_OP_BACKEND=torch HEADKV_SGLANG_COMPAT=0 SGLANG_FLASHINFER_USE_TENSOR_CORE=false
  MODEL=/tmp/llama3-8b-dummy
  mkdir -p $MODEL && cp .whl/tokenizer/* $MODEL/ && rm -f $MODEL/source_config.json
  $PY - "$MODEL" <<'EOF'
import json, sys
from transformers import AutoTokenizer
d = sys.argv[1]
vocab = len(AutoTokenizer.from_pretrained(d))
vocab = -(-vocab // 64) * 64
tok = json.load(open(f"{d}/tokenizer_config.json"))
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
       "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 32768,
       "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": vocab, "torch_dtype": "bfloat16",
       "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "_name_or_path": "llama3-8b-shaped-dummy"}
json.dump(cfg, open(f"{d}/config.json", "w"), indent=1)
print("model config: Llama-3-8B shape, vocab", vocab)
EOF
  SERVER_ARGS=(--load-format dummy --dtype bfloat16 --mem-fraction-static "$MEM" --sampling-backend pytorch
               --attention-backend flashinfer --context-length $((LEN_A + OUT_A + 256)))
  PROFILE_SHAPE="32 32 8 128"
  $PY -c 'import sglang.launch_server, sglang.bench_serving, headkv_sglang.plugin, flashinfer_ext.ragged, sgl_kernel; print("imports ok", sgl_kernel.__version__)' \
    > "$OUT/imports.log" 2>&1 || { echo "imports failed"; tail -20 "$OUT/imports.log"; exit 2; }
fi
# a random r2 profile of the model's shape for headkv (seeded; memory and speed only)
PROFILE=$OUT/random_r2_profile.json
PYTHONPATH=$REPO:${PYTHONPATH:-} $PY - "$PROFILE" $PROFILE_SHAPE <<'EOF'
import sys, torch
from headkv_sglang.profiles import HeadProfile
out, L, Hq, Hkv, D = sys.argv[1], *map(int, sys.argv[2:])
scores = torch.rand(L, Hq, generator=torch.Generator().manual_seed(43)).tolist()
HeadProfile(architecture="LlamaForCausalLM", model_name="random", num_layers=L, num_q_heads=Hq, num_kv_heads=Hkv,
            head_dim=D, method="r2", parameters={"random": 43}, scores=scores).save(out, heatmap=False)
EOF

URL=http://127.0.0.1:$PORT
SRV_PID=
start_server() {  # start_server NAME ARGS...: launch_server with the plugin; waits until healthy
  local name=$1; shift
  log "starting $name: $*"
  setsid $PY -m sglang.launch_server --model-path "$MODEL" --host 127.0.0.1 --port "$PORT" --enable-metrics \
      "${SERVER_ARGS[@]}" "$@" > "$OUT/$name.server.log" 2>&1 &
  SRV_PID=$!
  until curl -sf "$URL/health_generate" >/dev/null 2>&1; do
    if ! kill -0 $SRV_PID 2>/dev/null; then log "$name died"; tail -30 "$OUT/$name.server.log"; SRV_PID=; return 1; fi
    if [ $SECONDS -ge $DEADLINE ]; then log "$name: no time left to start"; stop_server; return 1; fi
    sleep 2
  done
  log "$name up"
}
stop_server() {
  [ -n "$SRV_PID" ] || return 0
  kill -- -$SRV_PID 2>/dev/null || kill $SRV_PID 2>/dev/null  # its own session (setsid): the whole server
  for _ in $(seq 30); do kill -0 $SRV_PID 2>/dev/null || break; sleep 1; done
  kill -9 -- -$SRV_PID 2>/dev/null; SRV_PID=
  sleep 3  # the GPU memory of its scheduler
}
trap stop_server EXIT
bench() {  # bench SERVER SHAPE LEN OUTLEN CONC: one bench_serving run, polled
  local server=$1 shape=$2 len=$3 olen=$4 c=$5
  local run=$OUT/runs/${server}__${shape}__c$c
  local left=$((DEADLINE - SECONDS))
  if [ $left -lt 30 ]; then log "skip $server $shape c=$c: no time left"; return 1; fi
  mkdir -p "$run"
  curl -s "$URL/metrics" > "$run/metrics_before.txt"
  curl -s "$URL/server_info" > /dev/null  # resets the plugin's peaks: what came before is not this run's
  ( while :; do curl -s -m 5 "$URL/server_info" | tr -d '\n' >> "$run/samples.jsonl"; echo >> "$run/samples.jsonl"; sleep 1; done ) &
  local poll=$!
  timeout $left $PY -m sglang.bench_serving --backend sglang-oai --base-url "$URL" --model default \
    --tokenizer "$MODEL" --dataset-name random-ids --random-input-len "$len" --random-output-len "$olen" \
    --random-range-ratio 1.0 --num-prompts "$c" --max-concurrency "$c" --request-rate inf --seed 43 \
    --output-file "$run/bench.jsonl" --disable-tqdm > "$run/bench.log" 2>&1
  local rc=$?
  kill $poll 2>/dev/null; wait $poll 2>/dev/null
  curl -s "$URL/server_info" | tr -d '\n' >> "$run/samples.jsonl"; echo >> "$run/samples.jsonl"
  curl -s "$URL/metrics" > "$run/metrics_after.txt"
  log "$server $shape c=$c rc=$rc: $(grep -E 'Output token throughput|Median TTFT|Median ITL' "$run/bench.log" | tr -s ' ' | tr '\n' ';')"
  return $rc
}
run_server() {  # run_server NAME SHAPES ARGS...
  local name=$1 shapes=$2; shift 2
  start_server "$name" "$@" || return 1
  for shape in $shapes; do
    if [ "$shape" = A ]; then for c in $CONC_A; do bench "$name" "${LEN_A}-${OUT_A}" "$LEN_A" "$OUT_A" "$c" || break; done; fi
    if [ "$shape" = B ]; then for c in $CONC_B; do bench "$name" "${LEN_B}-${OUT_B}" "$LEN_B" "$OUT_B" "$c" || break; done; fi
  done
  curl -s "$URL/server_info" > "$OUT/$name.server_info.json"
  stop_server
}
# full first: it JIT-compiles FlashInfer's prefill (~3 min on a fresh machine); headkv reuses the cache
run_server full "A B" --kv-policy full
run_server headkv "A B" --kv-policy headkv --kv-budget 1024 --kv-head-profile "$PROFILE"
run_server headkv-decode "B" --kv-policy headkv --kv-budget 1024 --kv-head-profile "$PROFILE" --kv-decode-budget "$DECODE_BUDGET"
# with time left: one memory (pages inside SGLang's token slots, the FlashInfer kernel planned token by token)
run_server headkv-shared "A" --kv-policy headkv --kv-budget 1024 --kv-head-profile "$PROFILE" --kv-memory shared
PYTHONPATH=$REPO:${PYTHONPATH:-} $PY benchmarks/server_table.py "$OUT/runs" --model "$MODEL" --out "$OUT/server_check_$GPU.md" \
  --title "Whole SGLang server, plain vs --kv-policy headkv ($GPU)" \
  --note "Command: \`bash scripts/gpu_server_check.sh OUT\` (CONC_A='$CONC_A' CONC_B='$CONC_B'). Llama-3-8B shape, --load-format dummy (random weights: memory and speed real, answers not), test model's tokenizer, random r2 profile; fused ops (RMSNorm, SiluAndMul, rotary) ran as torch (SGLANG_FORCE_FUSED_OP_BACKEND=torch, sgl_kernel stand-in), --sampling-backend pytorch, both servers alike; --mem-fraction-static $MEM; CUDA graphs and overlap scheduler on. headkv: --kv-budget 1024; headkv-decode: + --kv-decode-budget $DECODE_BUDGET; headkv-shared: + --kv-memory shared." \
  > "$OUT/table.log" 2>&1 || tail -5 "$OUT/table.log"
tar -czf "$OUT/runs.tgz" -C "$OUT" runs $(cd "$OUT" && ls *.log *.json env.txt 2>/dev/null | grep -v "server_check_") --remove-files 2>/dev/null
ls "$OUT"
