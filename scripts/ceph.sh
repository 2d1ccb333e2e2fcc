#!/usr/bin/env bash
# A one-node Ceph for vmsnap's tests and benchmarks: one mon, one mgr, one bluestore OSD on a
# sparse file and radosgw on 127.0.0.1, no systemd, small memory settings. Idempotent.
#
#   scripts/ceph.sh start    # create (first time, ~60 s) or restart (~15 s); waits for active+clean
#   scripts/ceph.sh stop     # stop every daemon it started (SIGTERM, then SIGKILL after 20 s)
#   scripts/ceph.sh status   # which daemons run; `ceph -s` when the mon is up
#   scripts/ceph.sh env      # shell exports for clients: CEPH_CONF, AWS_ENDPOINT_URL, keys
#   scripts/ceph.sh ports    # "MON_PORT RGW_PORT" of the state dir (made or to be made)
#
# State lives in $VMSNAP_CEPH_DIR (default build/ceph). Pools: `rbd` for images and RGW's
# pools (created up front: RGW's first PUT creates them slowly otherwise), bucket `vmsnap`.
# Ports (mon, radosgw on 127.0.0.1) are fixed when the cluster is created: 3300 and 7480 for
# build/ceph, a pair in 17000-18999 derived from the path of any other state dir (so two
# state dirs do not clash), or VMSNAP_MON_PORT / VMSNAP_RGW_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${VMSNAP_CEPH_DIR:-build/ceph}")
conf=$dir/ceph.conf
daemons=(radosgw osd mgr mon)   # stop order; start order is the reverse

say() { echo "ceph.sh: $*" >&2; }
pidfile() { echo "$dir/run/$1.pid"; }
alive() {  # alive PID: a process that is not a zombie (a killed daemon whose parent is a
  # non-reaping PID 1, as in some CI containers, stays a zombie that `kill -0` still sees)
  [[ -n $1 ]] && kill -0 "$1" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}
running() {  # running NAME: its pid file names a live process of ours
  local pid
  pid=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
  alive "$pid"
}
c() { timeout 60 ceph -c "$conf" "$@"; }

set_ports() {  # mon_port, rgw_port: from the cluster's ceph.conf once it exists
  local mon=3300 rgw=7480 h
  if [[ $dir != "$(realpath -m build/ceph)" ]]; then
    h=$(printf %s "$dir" | cksum)
    mon=$((17000 + ${h%% *} % 1000 * 2)) rgw=$((mon + 1))
  fi
  mon_port=${VMSNAP_MON_PORT:-$mon} rgw_port=${VMSNAP_RGW_PORT:-$rgw}
  [[ -s $conf ]] || return 0
  mon=$(sed -n 's/^mon host = v2:127\.0\.0\.1:\([0-9]*\)$/\1/p' "$conf")
  rgw=$(sed -n 's/^rgw frontends = beast endpoint=127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$conf")
  if [[ $mon_port != "$mon" && -n ${VMSNAP_MON_PORT:-} ]] ||
      [[ $rgw_port != "$rgw" && -n ${VMSNAP_RGW_PORT:-} ]]; then
    say "the cluster in $dir uses ports $mon and $rgw (stop it and remove $dir to change them)"
    exit 1
  fi
  mon_port=$mon rgw_port=$rgw
}

write_conf() {
  local fsid=$1
  cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$mon_port
mon initial members = a
public addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/\$cluster.\$name.keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
mgr initial modules = iostat
# a full OSD hangs client writes: clients give up instead
rados osd op timeout = 60
rados mon op timeout = 30

[mon]
mon data = $dir/mon
mon rocksdb options = write_buffer_size=8388608
keyring = $dir/mon/keyring

[mgr]
mgr data = $dir/mgr
keyring = $dir/mgr/keyring

[osd]
osd data = $dir/osd
keyring = $dir/osd/keyring
osd objectstore = bluestore
bluestore block path = $dir/osd.block
bluestore block size = ${VMSNAP_CEPH_OSD_SIZE:-32G}
bluestore block create = true
bluestore fsck on mount = false
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 2
osd op num threads per shard = 1
osd max object size = 134217728
# vmsnap replaces an RBD snapshot per save: trim them at once
osd snap trim sleep hdd = 0
osd snap trim sleep hybrid = 0

[client.rgw.a]
keyring = $dir/rgw/keyring
rgw data = $dir/rgw
rgw frontends = beast endpoint=127.0.0.1:$rgw_port tcp_nodelay=1
rgw thread pool size = 32
rgw dns name = 127.0.0.1
rgw gc obj min wait = 60
rgw gc processor period = 60
rgw gc processor max time = 60
rgw enable usage log = false
EOF
}

create() {
  say "creating a new cluster in $dir"
  rm -rf "$dir"
  mkdir -p -m 0700 "$dir"
  mkdir -p "$dir"/{run,log,mon,mgr,osd,rgw}
  local fsid osd_uuid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  write_conf "$fsid"
  ceph-authtool --create-keyring "$dir/run/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$dir/run/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
  monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/run/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/run/monmap" --keyring "$dir/run/mon.keyring"
  start_mon
  c auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$dir/mgr/keyring"
  start_daemon mgr ceph-mgr -c "$conf" -i x
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  local id
  id=$(c osd new "$osd_uuid")
  [[ $id == 0 ]] || { say "unexpected OSD id $id"; exit 1; }
  ceph-osd -c "$conf" -i 0 --no-mon-config --mkfs --mkkey --osd-uuid "$osd_uuid" \
    2>"$dir/log/osd-mkfs.log" || { say "OSD mkfs failed (see $dir/log/osd-mkfs.log)"; exit 1; }
  c auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$dir/osd/keyring" 2>>"$dir/log/setup.log"
  start_daemon osd ceph-osd -c "$conf" -i 0
  c osd pool create rbd 8 2>>"$dir/log/setup.log"
  rbd -c "$conf" pool init rbd
  local p
  for p in .rgw.root default.rgw.log default.rgw.control default.rgw.meta \
      default.rgw.buckets.index default.rgw.buckets.data default.rgw.buckets.non-ec; do
    c osd pool create "$p" 8 2>>"$dir/log/setup.log"
    c osd pool application enable "$p" rgw 2>>"$dir/log/setup.log"
  done
  c auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' -o "$dir/rgw/keyring"
  wait_clean
  start_daemon radosgw radosgw -c "$conf" -n client.rgw.a
  local access secret
  access=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  secret=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
  timeout 120 radosgw-admin -c "$conf" user create --uid=vmsnap --display-name=vmsnap \
    --access-key="$access" --secret-key="$secret" >/dev/null
  umask 077
  cat >"$dir/s3.env" <<EOF
export AWS_ACCESS_KEY_ID=$access
export AWS_SECRET_ACCESS_KEY=$secret
EOF
  wait_rgw
  make_bucket
}

start_mon() { start_daemon mon ceph-mon -c "$conf" -i a; }

start_daemon() {  # start_daemon NAME CMD...: daemonizes itself and writes its pid file
  local name=$1; shift
  running "$name" && return 0
  local pid_conf
  case $name in
    mon) pid_conf=mon.a ;; mgr) pid_conf=mgr.x ;; osd) pid_conf=osd.0 ;; radosgw) pid_conf=client.rgw.a ;;
  esac
  "$@" --pid-file "$(pidfile "$name")" 2>>"$dir/log/$pid_conf.stderr" 9>&- || {
    say "$name failed to start (see $dir/log/)"; exit 1; }
  for _ in $(seq 100); do running "$name" && return 0; sleep 0.1; done
  say "$name did not write its pid file"; exit 1
}

wait_clean() {  # every PG active+clean, maybe trimming snapshots or scrubbing
  local s total clean n state  # (HEALTH_OK comes before RGW's PGs are active)
  for _ in $(seq 240); do
    s=$(c pg stat 2>/dev/null || true)
    if [[ $s =~ ^([0-9]+)\ pgs:\ ([^;]*)\; ]]; then
      total=${BASH_REMATCH[1]} clean=0
      while read -r n state; do
        if [[ $state == active+clean || $state == active+clean+* ]]; then
          clean=$((clean + n))
        fi
      done < <(tr ',' '\n' <<<"${BASH_REMATCH[2]}")
      if ((total > 0 && clean == total)); then return 0; fi
    fi
    sleep 0.5
  done
  say "PGs not active+clean after 120 s: $s"; exit 1
}

osd_up_from() {  # the osdmap epoch from which osd.0 is up; empty while it is down
  c osd dump 2>/dev/null | sed -n 's/^osd\.0 up .* up_from \([0-9]*\) .*/\1/p'
}

wait_osd_boot() {  # wait_osd_boot EPOCH: the new OSD has booted (until then the monitor's
  local now     # PG states are those of the dead one: active+clean, then stale)
  for _ in $(seq 240); do
    now=$(osd_up_from)
    if [[ -n $now && $now != "$1" ]]; then return 0; fi
    sleep 0.5
  done
  say "osd.0 did not boot within 120 s"; exit 1
}

wait_rgw() {
  for _ in $(seq 240); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$rgw_port") 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  say "radosgw does not answer on 127.0.0.1:$rgw_port ($(running radosgw && echo running || echo exited);" \
    "log: $(tail -n 2 "$dir/log/client.rgw.a.log" 2>/dev/null | tr '\n' ' '))"
  exit 1
}

make_bucket() {  # idempotent; an S3 PUT bucket answers 200 when we own it already
  # shellcheck disable=SC1091
  (source "$dir/s3.env" && export AWS_ENDPOINT_URL="http://127.0.0.1:$rgw_port" &&
    .venv/bin/python - <<'EOF'
import boto3
boto3.client("s3", region_name="default").create_bucket(Bucket="vmsnap")
EOF
  )
}

start() {
  if [[ ! -s $dir/mon/keyring || ! -s $dir/s3.env ]]; then
    stop_all quiet
    create
  else
    start_mon
    start_daemon mgr ceph-mgr -c "$conf" -i x
    local dead=""  # a killed OSD the monitor still sees up (no peer reported it)
    running osd || dead=$(osd_up_from)
    start_daemon osd ceph-osd -c "$conf" -i 0
    [[ -z $dead ]] || wait_osd_boot "$dead"
    wait_clean
    start_daemon radosgw radosgw -c "$conf" -n client.rgw.a
    wait_rgw
  fi
  say "up: $(c pg stat)"
}

stop_all() {
  local name pid
  for name in "${daemons[@]}"; do
    pid=$(cat "$(pidfile "$name")" 2>/dev/null) || continue
    if alive "$pid"; then
      kill -TERM "$pid"
      for _ in $(seq 200); do alive "$pid" || break; sleep 0.1; done
      alive "$pid" && kill -KILL "$pid"
      [[ ${1:-} == quiet ]] || say "stopped $name ($pid)"
    fi
    rm -f "$(pidfile "$name")"
  done
}

status() {
  local name rc=0
  for name in mon mgr osd radosgw; do
    if running "$name"; then echo "$name: running ($(cat "$(pidfile "$name")"))"
    else echo "$name: stopped"; rc=3; fi
  done
  running mon && c -s 2>/dev/null || true
  return $rc
}

env_exports() {
  [[ -s $dir/s3.env ]] || { say "no cluster in $dir (run: scripts/ceph.sh start)"; exit 1; }
  echo "export CEPH_CONF=$conf"
  echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$rgw_port"
  echo "export AWS_DEFAULT_REGION=default"
  cat "$dir/s3.env"
}

mkdir -p "$(dirname "$dir")"
set_ports
case ${1:-} in
  start|stop) exec 9>"$dir.lock"; flock 9 ;;  # one start/stop at a time
esac
case ${1:-} in
  start) start ;;
  stop) stop_all ;;
  status) status ;;
  env) env_exports ;;
  ports) echo "$mon_port $rgw_port" ;;
  *) echo "usage: $0 start|stop|status|env|ports" >&2; exit 2 ;;
esac
