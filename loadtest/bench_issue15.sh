#!/usr/bin/env bash
# Issue 15 final runs: ours vs Hocuspocus, same harness, server on core 0, harness on core 1.
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=/tmp/b15; mkdir -p $OUT
start_ours() {
  rm -rf $OUT/data; mkdir -p $OUT/data
  COLLAB_MESSAGE_RATE=0 COLLAB_BYTE_RATE=0 COLLAB_MAX_CONNECTIONS_PER_IP=0 COLLAB_MAX_CONNECTIONS=0 COLLAB_LOG_LEVEL=warning \
    COLLAB_PORT=18801 COLLAB_DATA_DIR=$OUT/data prlimit --nofile=20000 taskset -c 0 $PY -m collab serve > $OUT/ours.log 2>&1 &
  SPID=$!; URL=ws://127.0.0.1:18801/ws; PROTO=""
  for i in $(seq 100); do curl -sf http://127.0.0.1:18801/readyz >/dev/null && break; sleep 0.1; done
}
start_hocus() {
  (cd loadtest/peers && HOST=127.0.0.1 PORT=18802 NODE_ENV=production prlimit --nofile=20000 taskset -c 0 node hocuspocus.mjs > $OUT/hocus.log 2>&1) &
  sleep 0.5; SPID=$(pgrep -n -f "node hocuspocus.mjs"); URL=ws://127.0.0.1:18802; PROTO="--protocol hocuspocus"
  for i in $(seq 100); do grep -q listening $OUT/hocus.log && break; sleep 0.1; done
}
stop() { kill -TERM $SPID 2>/dev/null; wait $SPID 2>/dev/null; sleep 0.5; }
run() {  # name server rooms clients writers interval map
  local name=$1 server=$2; shift 2
  if [ $server = ours ]; then start_ours; else start_hocus; fi
  echo "== $name $server load: $(cut -d' ' -f1-3 /proc/loadavg)"
  taskset -c 1 $PY -m loadtest fanout --url $URL --server-pid $SPID $PROTO --quiet \
     --rooms $1 --clients $2 --writers $3 --interval $4 --map $5 --duration 10 --drain 3 --json $OUT/$name-$server.json 2>&1 | tail -4
  stop
}
for s in ours hocuspocus; do
  run cfg50-1k $s 50 10 2 100 config
  run notes50-1k $s 50 10 2 100 notes
  run one100-100 $s 1 100 10 100 config
  run notes1-100 $s 1 100 10 100 notes
done
run cfg50-10k ours 50 10 2 10 config
run notes1-sat ours 1 100 10 1 notes
run notes1-sat hocuspocus 1 100 10 1 notes
