#!/usr/bin/env bash
# Offline validation of the deploy files: deploy/kubernetes (schema
# validation + the invariants the drain and security rely on),
# deploy/prometheus (promtool check/test), deploy/aws (cfn-lint),
# deploy/grafana (structure), the runbook anchors in docs/operations.md, and
# that every metric an alert or a panel uses exists in a live node's
# /metrics (or, for metrics that need Redis or Postgres, is registered in
# the sources under crates/).
#
# Installs its own tools on first use into $FLOWGATE_TOOLS_DIR (default
# ~/.cache/flowgate-tools): a Python venv with cfn-lint and
# kubernetes-validate, and promtool unpacked from Debian's `prometheus`
# package (unpacked, not installed: installing it would start a Prometheus
# server). Starts the local cluster of scripts/cluster.sh (Redis, Postgres
# behind PgBouncer, nodes of $FLOWGATE_BIN, default target/debug/flowgate,
# HAProxy) on free loopback ports in a temp dir, reads one node's /metrics,
# and stops it (cluster.sh down: by the PIDs it recorded).
#
# Exits non-zero if any check failed; prints what failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

TOOLS="${FLOWGATE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flowgate-tools}"
FLOWGATE_BIN="${FLOWGATE_BIN:-target/debug/flowgate}"
CFN_LINT_VERSION=1.58.0
KUBERNETES_VALIDATE_VERSION=1.37.0
# Oldest and newest Kubernetes versions the manifests are validated against.
K8S_VERSIONS=(1.29.0 1.37.0)

failed=()
check() {
    local name=$1
    shift
    echo "==> $name"
    if "$@"; then
        echo "ok: $name"
    else
        echo "FAILED: $name"
        failed+=("$name")
    fi
}

# ------------------------------------------------------------------ tools
apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        apt-get update -qq >/dev/null || return 1
        apt_updated=1
    fi
}

install_venv() {
    local venv="$TOOLS/venv"
    if [ -x "$venv/bin/cfn-lint" ] && [ -x "$venv/bin/kubernetes-validate" ] &&
        "$venv/bin/python" -c 'import yaml' 2>/dev/null &&
        [ "$("$venv/bin/cfn-lint" --version 2>/dev/null)" = "cfn-lint $CFN_LINT_VERSION" ]; then
        return 0
    fi
    mkdir -p "$TOOLS"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian's python3 needs python3-venv for `-m venv`.
        apt_update_once && apt-get install -y -qq python3-venv >/dev/null &&
            python3 -m venv "$venv" || return 1
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "cfn-lint==$CFN_LINT_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" pyyaml
}

PROMTOOL=""
install_promtool() {
    if command -v promtool >/dev/null 2>&1; then
        PROMTOOL=$(command -v promtool)
        return 0
    fi
    local dir="$TOOLS/prometheus"
    if [ ! -x "$dir/usr/bin/promtool" ]; then
        command -v apt-get >/dev/null || {
            echo "promtool not found and apt-get unavailable: install Prometheus' promtool"
            return 1
        }
        apt_update_once || return 1
        local dl
        dl=$(mktemp -d) || return 1
        # The _apt sandbox user cannot write to a root-owned temp dir; apt
        # then downloads as root, which is fine here.
        (cd "$dl" && apt-get download -qq prometheus 2>/dev/null) || {
            rm -rf "$dl"
            echo "apt-get download prometheus failed"
            return 1
        }
        rm -rf "$dir"
        if ! { mkdir -p "$dir" && dpkg-deb -x "$dl"/prometheus_*.deb "$dir"; }; then
            rm -rf "$dl"
            return 1
        fi
        rm -rf "$dl"
    fi
    PROMTOOL="$dir/usr/bin/promtool"
    "$PROMTOOL" --version >/dev/null 2>&1
}

check "install cfn-lint and kubernetes-validate (venv in $TOOLS)" install_venv
check "install promtool" install_promtool
PY="$TOOLS/venv/bin/python"
[ -x "$PY" ] || PY=python3

# ------------------------------------------------------------------ Kubernetes
# Kinds without a schema in kubernetes-validate, checked structurally below:
#  - kustomization.yaml: a kustomize file, not a Kubernetes object;
#  - servicemonitor.yaml: a CRD (monitoring.coreos.com/v1) whose schema
#    ships with the Prometheus Operator, not with Kubernetes.
k8s_schema() {
    local ok=0 f out v
    local files=()
    for f in deploy/kubernetes/*.yaml; do
        case "$(basename "$f")" in
        kustomization.yaml | servicemonitor.yaml) ;;
        *) files+=("$f") ;;
        esac
    done
    for v in "${K8S_VERSIONS[@]}"; do
        out=$("$TOOLS/venv/bin/kubernetes-validate" --strict -k "$v" "${files[@]}" 2>&1) || ok=1
        echo "$out"
        if grep -q "Couldn't find schema" <<<"$out"; then
            echo "a manifest has no schema in kubernetes-validate (add it to the skip list with a reason)"
            ok=1
        fi
    done
    return $ok
}
check "Kubernetes manifests: schema validation (kubernetes-validate --strict, ${K8S_VERSIONS[*]}; skipped: kustomization.yaml, servicemonitor.yaml CRD)" k8s_schema

k8s_invariants() {
    "$PY" - <<'EOF'
import glob, os, re, sys
import yaml

d = "deploy/kubernetes"
errors = []
def err(msg):
    errors.append(msg)

docs = {}
for path in sorted(glob.glob(f"{d}/*.yaml")):
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            if doc:
                docs.setdefault(doc.get("kind"), []).append((os.path.basename(path), doc))

def one(kind):
    items = docs.get(kind, [])
    if len(items) != 1:
        err(f"expected exactly one {kind}, found {len(items)}")
        return {}
    return items[0][1]

# kustomization lists every manifest except the example Secret.
kust = one("Kustomization")
listed = set(kust.get("resources", []))
present = {os.path.basename(p) for p in glob.glob(f"{d}/*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
for missing in sorted(present - listed):
    err(f"kustomization.yaml does not list {missing}")
for extra in sorted(listed - present):
    err(f"kustomization.yaml lists {extra}, which does not exist")
if "secret.example.yaml" in listed:
    err("kustomization.yaml must not apply secret.example.yaml (placeholder credentials)")

cm = one("ConfigMap").get("data", {})
dep = one("Deployment")
pod = dep.get("spec", {}).get("template", {}).get("spec", {})
labels = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
c = (pod.get("containers") or [{}])[0]

rp = c.get("readinessProbe", {})
if rp.get("httpGet", {}).get("path") != "/health":
    err("readiness probe must be GET /health")
lp = c.get("livenessProbe", {})
if not lp:
    err("no liveness probe")
if lp.get("httpGet", {}).get("path") == "/health":
    err("liveness probe must not be /health (503 while draining or without Redis)")

ms = lambda k, default: int(cm.get(k, default))
deadline_s = ms("FLOWGATE_SHUTDOWN_DEADLINE_MS", 30000) / 1000
pre = c.get("lifecycle", {}).get("preStop", {})
sleep_s = 0
if "sleep" in pre:
    sleep_s = int(pre["sleep"]["seconds"])
else:
    cmd = pre.get("exec", {}).get("command", [])
    m = re.search(r"sleep\D+(\d+)", " ".join(cmd))
    sleep_s = int(m.group(1)) if m else None
if not sleep_s:
    err("preStop must sleep while the endpoint removal propagates")
    sleep_s = 0
grace = pod.get("terminationGracePeriodSeconds", 30)
if grace <= sleep_s + deadline_s:
    err(f"terminationGracePeriodSeconds {grace} must exceed preStop {sleep_s}s + shutdown deadline {deadline_s}s")
if lp and lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3) <= grace:
    err("liveness period x failureThreshold must exceed the grace period, so a drain cannot trip it")

res = c.get("resources", {})
for k in ("requests", "limits"):
    for r in ("cpu", "memory"):
        if r not in res.get(k, {}):
            err(f"container resources.{k}.{r} missing")

psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
    err("runAsNonRoot not set")
if not csc.get("readOnlyRootFilesystem"):
    err("readOnlyRootFilesystem not set")
if csc.get("allowPrivilegeEscalation") is not False:
    err("allowPrivilegeEscalation must be false")
if "ALL" not in csc.get("capabilities", {}).get("drop", []):
    err("capabilities must drop ALL")

env = {e["name"]: e for e in c.get("env", [])}
for key in ("JWT_ACCESS_TOKEN_SECRET", "FLOWGATE_SERVICE_TOKEN", "DATABASE_URL", "REDIS_URL"):
    if not env.get(key, {}).get("valueFrom", {}).get("secretKeyRef"):
        err(f"{key} must come from a Secret")
if env.get("FLOWGATE_NODE_ID", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
    err("FLOWGATE_NODE_ID must come from the pod name (fieldRef metadata.name)")
if "DATABASE_DIRECT_URL" in env:
    err("serving pods must not get DATABASE_DIRECT_URL (migrations only)")
if not any(s.get("configMapRef", {}).get("name") == one("ConfigMap").get("metadata", {}).get("name") for s in c.get("envFrom", [])):
    err("the Deployment must take the ConfigMap with envFrom")
ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}
if ports.get("http") != int(cm.get("PORT", 8080)):
    err("container port 'http' must match PORT")

def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

if not selects(dep.get("spec", {}).get("selector", {}).get("matchLabels", {}), labels):
    err("Deployment selector does not match its pod labels")
svc = one("Service")
if not selects(svc.get("spec", {}).get("selector", {}), labels):
    err("Service selector does not match the pods")
svc_ports = {p.get("name") for p in svc.get("spec", {}).get("ports", [])}
pdb = one("PodDisruptionBudget")
if not selects(pdb.get("spec", {}).get("selector", {}).get("matchLabels", {}), labels):
    err("PodDisruptionBudget selector does not match the pods")

hpa = one("HorizontalPodAutoscaler")
if hpa.get("apiVersion") != "autoscaling/v2":
    err("HPA must be autoscaling/v2")
if hpa.get("spec", {}).get("scaleTargetRef", {}).get("name") != dep.get("metadata", {}).get("name"):
    err("HPA does not target the Deployment")
metrics = hpa.get("spec", {}).get("metrics", [])
if not any(m.get("type") == "Resource" and m["resource"]["name"] == "cpu" for m in metrics):
    err("HPA must scale on CPU")
if not any(m.get("type") == "Pods" and m["pods"]["metric"]["name"] == "flowgate_connections" for m in metrics):
    err("HPA must scale on the flowgate_connections Pods metric")
if "replicas" in dep.get("spec", {}):
    err("Deployment sets replicas although an HPA owns the count")

# ServiceMonitor: structural check (no CRD schema offline).
sm = one("ServiceMonitor")
if sm.get("apiVersion") != "monitoring.coreos.com/v1":
    err("ServiceMonitor apiVersion must be monitoring.coreos.com/v1")
if not selects(sm.get("spec", {}).get("selector", {}).get("matchLabels", {}), svc.get("metadata", {}).get("labels", {})):
    err("ServiceMonitor selector does not match the Service labels")
eps = sm.get("spec", {}).get("endpoints", [])
if not eps or any(e.get("path") != "/metrics" or e.get("port") not in svc_ports for e in eps):
    err("ServiceMonitor endpoints must scrape /metrics on a named Service port")

job = one("Job")
jc = (job.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or [{}])[0]
if "migrate" not in (jc.get("args", []) + jc.get("command", [])):
    err("the migration Job must run `flowgate migrate`")
jenv = {e["name"]: e for e in jc.get("env", [])}
if not jenv.get("DATABASE_DIRECT_URL", {}).get("valueFrom", {}).get("secretKeyRef"):
    err("the migration Job must take DATABASE_DIRECT_URL from the Secret")
if "DATABASE_URL" in jenv:
    err("the migration Job must not use DATABASE_URL (migrations never go through the pooler)")

for e in errors:
    print("  -", e)
sys.exit(1 if errors else 0)
EOF
}
check "Kubernetes manifests: probes, drain timing, security, Secret/ConfigMap, HPA, ServiceMonitor, Job" k8s_invariants

# ------------------------------------------------------------------ Prometheus
check "promtool check rules deploy/prometheus/alerts.yml" "$PROMTOOL" check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts.test.yml" "$PROMTOOL" test rules deploy/prometheus/alerts.test.yml
check "promtool check config deploy/prometheus/prometheus.yml" "$PROMTOOL" check config deploy/prometheus/prometheus.yml

alert_annotations() {
    "$PY" - <<'EOF'
import re, sys
import yaml

def slug(heading):
    # GitHub's anchor for a heading.
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")

anchors = set()
with open("docs/operations.md") as f:
    for line in f:
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            anchors.add(slug(m.group(1)))

errors = []
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
names = []
for g in rules["groups"]:
    for r in g["rules"]:
        if "alert" not in r:
            continue
        names.append(r["alert"])
        a = r.get("annotations", {})
        for k in ("summary", "description", "runbook_url"):
            if not a.get(k):
                errors.append(f"{r['alert']}: no {k}")
        url = a.get("runbook_url", "")
        if not url.startswith("docs/operations.md#"):
            errors.append(f"{r['alert']}: runbook_url {url!r} does not point at docs/operations.md")
        elif url.split("#", 1)[1] not in anchors:
            errors.append(f"{r['alert']}: docs/operations.md has no section #{url.split('#', 1)[1]}")
        if "severity" not in r.get("labels", {}):
            errors.append(f"{r['alert']}: no severity label")
if len(names) != len(set(names)):
    errors.append("duplicate alert names")
required = ["FlowgateRedisDown", "FlowgateNoReadyNodes", "FlowgateEventLogBacklogGrowing",
            "FlowgateSlowConsumersSpiking", "FlowgateRecoveryFailures", "FlowgatePostgresDown"]
for n in required:
    if n not in names:
        errors.append(f"alert {n} missing")
for e in errors:
    print("  -", e)
print(f"  {len(names)} alerts, runbook sections found for all" if not errors else "")
sys.exit(1 if errors else 0)
EOF
}
check "alerts: summary/description/runbook_url, runbook sections exist in docs/operations.md" alert_annotations

# ------------------------------------------------------------------ AWS
check "cfn-lint deploy/aws/flowgate.yaml" "$TOOLS/venv/bin/cfn-lint" deploy/aws/flowgate.yaml

aws_invariants() {
    "$PY" - <<'EOF'
import sys
import yaml

class Loader(yaml.SafeLoader):
    pass
def any_tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node, deep=True)}
    return {suffix: loader.construct_mapping(node, deep=True)}
Loader.add_multi_constructor("!", any_tag)

t = yaml.load(open("deploy/aws/flowgate.yaml"), Loader=Loader)
res = t["Resources"]
def of(kind):
    return [r["Properties"] for r in res.values() if r["Type"] == kind]
errors = []
tg = of("AWS::ElasticLoadBalancingV2::TargetGroup")[0]
if tg.get("HealthCheckPath") != "/health":
    errors.append("target group health check must be /health")
attrs = {a["Key"]: a["Value"] for a in tg.get("TargetGroupAttributes", [])}
if int(attrs.get("deregistration_delay.timeout_seconds", 300)) < 30:
    errors.append("deregistration delay must be >= the drain time (30 s)")
lb = of("AWS::ElasticLoadBalancingV2::LoadBalancer")[0]
lattrs = {a["Key"]: a["Value"] for a in lb.get("LoadBalancerAttributes", [])}
if int(lattrs.get("idle_timeout.timeout_seconds", 60)) <= 25:
    errors.append("ALB idle timeout must exceed the Engine.IO ping interval (25 s)")
asg = of("AWS::AutoScaling::AutoScalingGroup")[0]
hooks = [h for h in asg.get("LifecycleHookSpecificationList", [])
         if h.get("LifecycleTransition") == "autoscaling:EC2_INSTANCE_TERMINATING"]
if not hooks or int(hooks[0].get("HeartbeatTimeout", 0)) < 30:
    errors.append("the ASG needs a termination lifecycle hook with a heartbeat >= 30 s")
if asg.get("HealthCheckType") == "ELB":
    errors.append("ASG health check must not be ELB (/health is 503 during Redis outages)")
if not any(l.get("Protocol") == "HTTPS" for l in of("AWS::ElasticLoadBalancingV2::Listener")):
    errors.append("no HTTPS listener")
rg = of("AWS::ElastiCache::ReplicationGroup")[0]
for k in ("NumNodeGroups", "ReplicasPerNodeGroup"):
    if k not in rg:
        errors.append(f"ElastiCache: {k} missing (cluster mode)")
if rg.get("TransitEncryptionEnabled") is not True:
    errors.append("ElastiCache transit encryption must be on")
ports = sorted({str(r.get("FromPort")) if not isinstance(r.get("FromPort"), dict) else "param"
                for r in of("AWS::EC2::SecurityGroupIngress")})
for p in ("8080", "6379"):
    if p not in ports:
        errors.append(f"no security-group ingress on {p}")
for e in errors:
    print("  -", e)
sys.exit(1 if errors else 0)
EOF
}
check "CloudFormation: health check, deregistration delay, idle timeout, lifecycle hook, ElastiCache cluster mode + TLS" aws_invariants

# ------------------------------------------------------------------ Grafana
grafana_structure() {
    "$PY" - <<'EOF'
import json, sys
errors = []
try:
    dash = json.load(open("deploy/grafana/flowgate.json"))
except ValueError as e:
    print("  - invalid JSON:", e)
    sys.exit(1)
DS = "${datasource}"
if not isinstance(dash.get("schemaVersion"), int):
    errors.append("no schemaVersion")
tvars = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
ds = tvars.get("datasource", {})
if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
    errors.append("templating needs a `datasource` variable of type datasource, query prometheus")
inst = tvars.get("instance", {})
if inst.get("type") != "query" or inst.get("datasource", {}).get("uid") != DS:
    errors.append("templating needs an `instance` query variable on ${datasource}")

def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))
ids, count = set(), 0
for p in walk(dash.get("panels", [])):
    title = p.get("title", "?")
    if p.get("id") in ids:
        errors.append(f"duplicate panel id {p.get('id')} ({title})")
    ids.add(p.get("id"))
    if "gridPos" not in p:
        errors.append(f"{title}: no gridPos")
    if p.get("type") == "row":
        continue
    count += 1
    d = p.get("datasource") or {}
    if d.get("uid") != DS or d.get("type") != "prometheus":
        errors.append(f"{title}: datasource must be {{type: prometheus, uid: {DS}}}")
    targets = p.get("targets") or []
    if not targets:
        errors.append(f"{title}: no targets")
    for t in targets:
        if not (t.get("expr") or "").strip():
            errors.append(f"{title}: target {t.get('refId')} has no expr")
        td = t.get("datasource")
        if td is not None and td.get("uid") != DS:
            errors.append(f"{title}: target {t.get('refId')} datasource must be {DS}")
for e in errors:
    print("  -", e)
if not errors:
    print(f"  {count} panels, all on {DS}, every target has an expr")
sys.exit(1 if errors else 0)
EOF
}
check "Grafana dashboard: JSON, variables, every panel on \${datasource}, every target has an expr" grafana_structure

# ------------------------------------------------------------------ metrics
# Every metric is looked for on a live node of a real local cluster; for
# labelled families no request has touched yet, the registration in
# crates/*/src is the fallback evidence.
METRICS_TMP=$(mktemp -d)
cluster_dir=""
cleanup() {
    if [ -n "$cluster_dir" ]; then
        FLOWGATE_CLUSTER_DIR="$cluster_dir" bash scripts/cluster.sh down >/dev/null 2>&1
    fi
    rm -rf "$METRICS_TMP"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Connects a Socket.IO client over a raw WebSocket (stdlib only) so that the
# labelled families (events in/out, refusals, protocol errors, refused
# connections, fan-out latency) get their first series.
exercise_node() {
    python3 - "$1" <<'EOF'
import base64, hashlib, hmac, json, os, socket, struct, sys, time

port = int(sys.argv[1])

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def jwt(secret, claims):
    h = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    p = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(sig)}"

def http_get(path):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    while s.recv(4096):
        pass
    s.close()

class WS:
    def __init__(self):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall((f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                        f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.s.recv(1)
            if not chunk:
                raise RuntimeError("upgrade: connection closed")
            head += chunk
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError("upgrade refused: " + head.split(b"\r\n")[0].decode())
    def exact(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError
            b += c
        return b
    def recv(self):
        b0, b1 = self.exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self.exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self.exact(8))[0]
        data = self.exact(n)
        if b0 & 0x0F == 8:
            raise EOFError
        return data.decode(errors="replace")
    def send(self, text):
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
        self.s.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
    def until(self, pred, limit=20):
        for _ in range(limit):
            m = self.recv()
            if m == "2":
                self.send("3")
                continue
            if pred(m):
                return m
        raise RuntimeError("expected packet not received")

try:
    http_get("/socket.io/?EIO=3&transport=websocket")  # refused: bad request
    token = jwt("x", {"userId": "check-deploy", "exp": int(time.time()) + 600})
    a, b = WS(), WS()
    for ws in (a, b):
        ws.until(lambda m: m.startswith("0"))
        ws.send("40/flows," + json.dumps({"token": token}))
        ws.until(lambda m: m.startswith("40/flows"))
    # Not in a flow yet: refused with NOT_IN_FLOW.
    a.send('42/flows,["cursor:move",{"position":{"x":1,"y":2}}]')
    for ws in (a, b):
        ws.send('42/flows,1["flow:join",{"flowId":"check-deploy"}]')
        ws.until(lambda m: m.startswith("43/flows"))
    # Relayed to b through the engine: events out, fan-out latency.
    a.send('42/flows,["pod:move",{"podId":"p1","position":{"x":1,"y":2}}]')
    b.until(lambda m: "pod:moved" in m)
    # A malformed packet closes that connection: a protocol error.
    a.send("4x")
    time.sleep(0.3)
    print("  exercised the node: refused upgrade, two clients, join, refusal, relay, protocol error")
except Exception as e:  # the comparison below decides; this only adds series
    print(f"  warning: exercising the node stopped early: {e}")
EOF
}

# A node of the local cluster (scripts/cluster.sh: Redis, Postgres behind
# PgBouncer, three nodes, HAProxy), so that the metrics of the Redis engine,
# the pool and the event-log writer are on its /metrics too.
live_metrics() {
    local out=$1 dir="$METRICS_TMP/cluster" bin
    if [ ! -x "$FLOWGATE_BIN" ]; then
        echo "  $FLOWGATE_BIN not found: build it (cargo build -p flowgate-gateway) or set FLOWGATE_BIN"
        return 1
    fi
    bin="$(cd "$(dirname "$FLOWGATE_BIN")" && pwd)/$(basename "$FLOWGATE_BIN")"
    # The postgres system user must traverse the state dir (mktemp: 0700).
    chmod 755 "$METRICS_TMP"
    if ! env -u REDIS_URL -u DATABASE_URL -u DATABASE_DIRECT_URL \
        FLOWGATE_CLUSTER_DIR="$dir" FLOWGATE_CLUSTER_SKIP_DEPS=1 FLOWGATE_BIN="$bin" \
        FLOWGATE_ACCESS_POLICY=open JWT_ACCESS_TOKEN_SECRET=x \
        FLOWGATE_DRAIN_NOTICE_MS=0 FLOWGATE_DRAIN_WINDOW_MS=0 \
        bash scripts/cluster.sh up >"$METRICS_TMP/cluster.log" 2>&1; then
        echo "  scripts/cluster.sh up failed:"
        sed 's/^/    /' "$METRICS_TMP/cluster.log" | tail -20
        return 1
    fi
    cluster_dir="$dir"
    local port
    port="$(sed -n 's/^NODE1_PORT=//p' "$dir/cluster.env")"
    echo "  node1 of scripts/cluster.sh on 127.0.0.1:$port (Redis, PgBouncer, Postgres)"
    exercise_node "$port"
    curl -fsS "http://127.0.0.1:$port/metrics" >"$out"
    local rc=$?
    FLOWGATE_CLUSTER_DIR="$dir" bash scripts/cluster.sh down >>"$METRICS_TMP/cluster.log" 2>&1
    cluster_dir=""
    return $rc
}

metric_names() {
    local live_ok=1
    if live_metrics "$METRICS_TMP/metrics.txt"; then
        live_ok=0
    else
        echo "  no live /metrics: every metric must then be found in the sources, and this check fails"
        : >"$METRICS_TMP/metrics.txt"
    fi
    "$PY" - "$METRICS_TMP/metrics.txt" "$live_ok" <<'EOF'
import glob, json, re, sys
import yaml

live_file, live_ok = sys.argv[1], sys.argv[2] == "0"
NAME = re.compile(r"\b(flowgate_[a-zA-Z0-9_]+)")

def base(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name

used = {}
rules = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
for g in rules["groups"]:
    for r in g["rules"]:
        for n in NAME.findall(r["expr"]):
            used.setdefault(base(n), set()).add("alert " + r.get("alert", r.get("record", "?")))
dash = json.load(open("deploy/grafana/flowgate.json"))
def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))
for p in walk(dash.get("panels", [])):
    for t in p.get("targets", []):
        for n in NAME.findall(t.get("expr", "")):
            used.setdefault(base(n), set()).add("panel " + p.get("title", "?"))
for v in dash.get("templating", {}).get("list", []):
    q = v.get("query")
    q = q.get("query", "") if isinstance(q, dict) else (q or "")
    for n in NAME.findall(q):
        used.setdefault(base(n), set()).add("variable " + v.get("name", "?"))

live = set()
for line in open(live_file):
    if line.startswith("#") or not line.strip():
        continue
    live.add(base(re.split(r"[{\s]", line, 1)[0]))

# Sources: a metric is registered under its name without the registry's
# `flowgate` prefix (or, rarely, with it), as a string literal followed by
# its help text — `IntGauge::new("redis_up", "1 while ...")`,
# `counter_vec("refusals_total", "...", "code")` — in a file that uses the
# prometheus crate. Tests and test support are excluded.
sources = {}
for path in glob.glob("crates/*/src/**/*.rs", recursive=True):
    if "/test-support/" in path or "/tests/" in path:
        continue
    text = open(path, encoding="utf-8", errors="replace").read()
    if "prometheus" not in text:
        continue
    sources[path] = text
def registered(name):
    short = name[len("flowgate_"):]
    pattern = re.compile(r'"(?:flowgate_)?' + re.escape(short) + r'"\s*,\s*"')
    found = []
    for p, t in sorted(sources.items()):
        m = pattern.search(t)
        if m:
            found.append(f"{p}:{t.count(chr(10), 0, m.start()) + 1}")
    return found

missing = []
rows = []
for name in sorted(used):
    if name in live:
        rows.append((name, "live /metrics"))
        continue
    where = registered(name)
    if where:
        rows.append((name, "sources: " + ", ".join(where)))
    else:
        rows.append((name, "MISSING"))
        missing.append(name)
w = max(len(n) for n, _ in rows)
for n, how in rows:
    print(f"  {n:<{w}}  {how}")
n_live = sum(1 for _, h in rows if h == "live /metrics")
print(f"  {len(rows)} metrics used: {n_live} found live, {len(rows) - n_live - len(missing)} in the sources only, {len(missing)} missing")
for n in missing:
    print(f"  - {n} (used by {', '.join(sorted(used[n]))}) is neither on a live node nor registered in crates/")
sys.exit(1 if missing or not live_ok else 0)
EOF
}
check "every metric used by alerts and panels exists (live /metrics of a cluster node, else registered in crates/)" metric_names

echo
if [ "${#failed[@]}" -ne 0 ]; then
    echo "check-deploy: ${#failed[@]} check(s) failed:"
    for f in "${failed[@]}"; do
        echo "  - $f"
    done
    exit 1
fi
echo "check-deploy: all checks passed"
