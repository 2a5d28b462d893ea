"""Checks of a rendered embedding-worker release that a schema cannot express.

Usage: python helm/check_rendered.py RENDERED.yaml --partitions N [--name SCENARIO]
       [--values MERGED_VALUES.json]

Run by helm/check.sh on the output of `helm template` for each CI scenario, after
kubernetes-validate. It checks:

* the custom resources kubernetes-validate skips (KEDA ScaledObject, prometheus-operator
  ServiceMonitor and PrometheusRule) against models generated from their CRDs
  (cloudcoil-models-keda / -prometheus-operator): every field must exist in the CRD with the
  right type, and nothing may be dropped by the model (a misspelt field would be pruned by the
  API server);
* the chart's promises: no Secret and no secret value rendered; the pod security settings
  (non-root, read-only root filesystem, no privilege escalation, all capabilities dropped,
  seccomp RuntimeDefault, /tmp emptyDir); probes on /healthz and /readyz; a grace period
  >= 45 s; the migration Job is a pre-install/pre-upgrade hook running `migrate` with the same
  image, settings and secrets as the worker and is not selected by the worker's selector;
  at most one autoscaler, the Deployment leaves replicas to it, and no autoscaler's maximum
  exceeds the partition count;
* the NetworkPolicy, when rendered: it selects exactly the worker pods and admits ingress to
  the http port only; the bind address is not a loopback address (probes use the pod IP);
* the analysis stage: off, nothing of it is rendered; on, the worker (only: the Job runs before
  the ConfigMap exists) mounts the analysis ConfigMap read-only where
  EMBEDDING_WORKER_ANALYSIS__FILE points, the pods roll on its content (checksum/analysis), and
  a rendered analysis file (with the files next to it) is one the worker itself accepts: it is
  loaded with the worker's own AnalysisSettings (worker/config.py), topics from the ConfigMap;
* the dashboard ConfigMap and the PrometheusRule are rendered exactly when enabled; the
  ConfigMap carries the sidecar's label and the dashboard file unchanged, the rule holds the
  enabled alerts only (their queries are checked by scripts/check_monitoring.py).
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SECRET_ENV = {
    "EMBEDDING_WORKER_POSTGRES__DSN",
    "DASHSCOPE_API_KEY",
    "EMBEDDING_WORKER_DASHSCOPE_API_KEY",
    "EMBEDDING_WORKER_PROVIDER__API_KEY",
    "EMBEDDING_WORKER_KAFKA__SASL_PASSWORD",
}

ANALYSIS_FILE = "EMBEDDING_WORKER_ANALYSIS__FILE"
TRACING_ENV = ("POD_NAME", "POD_NAMESPACE", "OTEL_RESOURCE_ATTRIBUTES")
WORKER_ONLY_ENV = (ANALYSIS_FILE, *TRACING_ENV)
DASHBOARD = Path(__file__).parent / "embedding-worker" / "dashboards" / "embedding-worker.json"

failures: list[str] = []


def check(ok: bool, message: str) -> None:
    if not ok:
        failures.append(message)


def one(docs: list[Doc], kind: str, component: str | None = None) -> Doc | None:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None
            or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]
    check(len(found) <= 1, f"more than one {kind}")
    return found[0] if found else None


def check_crd(doc: Doc) -> None:
    """Validate a custom resource against its CRD's generated model; nothing may be dropped."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    models: dict[str, type[ScaledObject] | type[ServiceMonitor] | type[PrometheusRule]] = {
        "ScaledObject": ScaledObject,
        "ServiceMonitor": ServiceMonitor,
    }
    try:
        model = models.get(doc["kind"], PrometheusRule).model_validate(doc)
    except Exception as exc:  # pydantic.ValidationError, with the path of each bad field
        check(False, f"{doc['kind']} does not fit its CRD: {exc}")
        return
    again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    for path in differences(doc, again):
        check(False, f"{doc['kind']}: {path} is unknown to the CRD or of the wrong type")


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            p
            for key in sorted(set(a) | set(b), key=str)
            for p in differences(a.get(key), b.get(key), f"{path}.{key}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            p
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for p in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b and type(a) is type(b) else [path or "."]


def container_env(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def check_pod(kind: str, pod: Doc) -> Doc:
    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, f"{kind}: pod runAsNonRoot")
    check(
        psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{kind}: pod seccompProfile RuntimeDefault",
    )
    check(spec.get("automountServiceAccountToken") is False, f"{kind}: token mounted")
    (container,) = spec["containers"]
    assert isinstance(container, dict)
    sc = container.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True, f"{kind}: readOnlyRootFilesystem")
    check(sc.get("allowPrivilegeEscalation") is False, f"{kind}: allowPrivilegeEscalation")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{kind}: capabilities.drop ALL")
    check(sc.get("runAsNonRoot") is True, f"{kind}: container runAsNonRoot")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    check(
        "emptyDir" in volumes.get(mounts.get("/tmp", ""), {}),
        f"{kind}: /tmp is not an emptyDir",
    )
    check("resources" in container, f"{kind}: no resources")
    for name, entry in container_env(container).items():
        if name in SECRET_ENV:
            check(
                "secretKeyRef" in entry.get("valueFrom", {}) and "value" not in entry,
                f"{kind}: {name} must come from a secretKeyRef",
            )
    return container


def configmap_volumes(pod: Doc) -> dict[str, str]:
    """Volume name -> name of the ConfigMap it mounts."""
    volumes = pod["spec"].get("volumes", [])
    return {v["name"]: v["configMap"]["name"] for v in volumes if "configMap" in v}


def check_analysis(
    pod: Doc, worker: Doc, analysis_cm: Doc | None, job: Doc | None, config: dict[str, str]
) -> None:
    """The analysis file's ConfigMap, mount, env and checksum; the file loads in the worker."""
    annotations = pod["metadata"].get("annotations", {})
    value = container_env(worker).get(ANALYSIS_FILE, {}).get("value")
    volumes = configmap_volumes(pod)
    if value is None:  # off
        check(analysis_cm is None, "an analysis ConfigMap the worker does not use")
        check("analysis" not in volumes, "an analysis volume while analysis is off")
        check("checksum/analysis" not in annotations, "checksum/analysis while analysis is off")
        return
    directory, file_name = posixpath.split(value)
    mounts = [m for m in worker.get("volumeMounts", []) if m["mountPath"] == directory]
    check(len(mounts) == 1, f"{ANALYSIS_FILE}={value}: {directory} is not mounted (once)")
    if len(mounts) != 1:
        return
    check(mounts[0].get("readOnly") is True, "the analysis mount is not read-only")
    mounted = volumes.get(mounts[0]["name"])
    check(mounted is not None, f"{directory} is not a ConfigMap volume")
    if job is not None:
        job_pod = job["spec"]["template"]
        check(
            mounted not in configmap_volumes(job_pod).values(),
            "the migration Job mounts the analysis ConfigMap (a hook runs before it exists)",
        )
        check(
            ANALYSIS_FILE not in container_env(job_pod["spec"]["containers"][0]),
            f"the migration Job has {ANALYSIS_FILE} without the file",
        )
    if analysis_cm is None:  # analysis.existingConfigMap: made outside the chart
        check("checksum/analysis" not in annotations, "checksum/analysis of no rendered file")
        return
    check(mounted == analysis_cm["metadata"]["name"], "the worker mounts another ConfigMap")
    check("checksum/analysis" in annotations, "no checksum/analysis: pods would not roll")
    data: dict[str, str] = analysis_cm.get("data", {})
    check(file_name in data, f"the analysis ConfigMap has no {file_name}")
    if file_name not in data:
        return
    from worker.config import AnalysisSettings

    with tempfile.TemporaryDirectory() as tmp:
        for name, content in data.items():
            (Path(tmp) / name).write_text(content, encoding="utf-8")
        topics = {
            "classifications_topic": config.get(
                "EMBEDDING_WORKER_ANALYSIS__CLASSIFICATIONS_TOPIC", "content.classifications"
            ),
            "anomalies_topic": config.get(
                "EMBEDDING_WORKER_ANALYSIS__ANOMALIES_TOPIC", "content.anomalies"
            ),
        }
        try:
            spec = AnalysisSettings(file=Path(tmp) / file_name, **topics).spec
        except Exception as exc:  # pydantic.ValidationError with the worker's own message
            check(False, f"the worker refuses the analysis file: {exc}")
            return
        check(bool(spec.namespaces), "the analysis file configures no namespace")
        input_topic = config.get("EMBEDDING_WORKER_KAFKA__INPUT_TOPIC", "content.events")
        check(input_topic not in topics.values(), "a results topic is the input topic")


def check_monitoring(values: Doc, dashboard_cm: Doc | None, rule: Doc | None) -> None:
    """The dashboard ConfigMap and the PrometheusRule follow their values."""
    dash = values["grafanaDashboard"]
    check((dashboard_cm is not None) == dash["enabled"], "dashboard ConfigMap != enabled")
    if dashboard_cm is not None:
        labels = dashboard_cm["metadata"]["labels"]
        check(labels.get(dash["label"]) == dash["labelValue"], "the sidecar's label is missing")
        shipped = json.loads(dashboard_cm["data"]["embedding-worker.json"])
        check(shipped == json.loads(DASHBOARD.read_text()), "the dashboard differs from its file")
    rules = values["prometheusRule"]
    check((rule is not None) == rules["enabled"], "PrometheusRule != prometheusRule.enabled")
    if rule is not None:
        alerts = [a for group in rule["spec"]["groups"] for a in group["rules"]]
        enabled = sum(1 for r in rules["rules"].values() if r["enabled"])
        check(len(alerts) == enabled, f"{len(alerts)} alerts rendered, {enabled} enabled")
        for alert in alerts:
            check(
                alert["labels"].items() >= rules["alertLabels"].items(),
                f"{alert['alert']}: without prometheusRule.alertLabels",
            )


def check_tracing(tracing: Doc, config: Doc, env: dict[str, Doc]) -> None:
    """The tracing values become the worker's settings, and the pods name themselves."""
    on = tracing["enabled"]
    check(
        (config.get("EMBEDDING_WORKER_TRACING__ENABLED") == "true") == on,
        "tracing.enabled does not match EMBEDDING_WORKER_TRACING__ENABLED",
    )
    check(
        config.get("EMBEDDING_WORKER_TRACING__ENDPOINT")
        == ((tracing["endpoint"] or None) if on else None),
        "tracing.endpoint does not match EMBEDDING_WORKER_TRACING__ENDPOINT",
    )
    ratio = tracing["sampleRatio"]
    check(
        config.get("EMBEDDING_WORKER_TRACING__SAMPLE_RATIO")
        == (str(ratio) if on and ratio is not None else None),
        "tracing.sampleRatio does not match EMBEDDING_WORKER_TRACING__SAMPLE_RATIO",
    )
    attributes = env.get("OTEL_RESOURCE_ATTRIBUTES", {}).get("value", "")
    check(
        ("k8s.pod.name=$(POD_NAME)" in attributes and "POD_NAME" in env) == on,
        "with tracing on, the pods must name themselves in OTEL_RESOURCE_ATTRIBUTES (only then)",
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered")
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--name", help="scenario name for the messages")
    parser.add_argument("--values", help="the scenario's merged values (JSON)")
    args = parser.parse_args()
    with open(args.rendered) as f:
        docs: list[Doc] = [d for d in yaml.safe_load_all(f) if d]

    check(all(d["kind"] != "Secret" for d in docs), "a Secret is rendered")
    for doc in docs:
        if doc["kind"] in ("ScaledObject", "ServiceMonitor", "PrometheusRule"):
            check_crd(doc)

    deploy = one(docs, "Deployment")
    # The settings ConfigMap is named like the Deployment; the analysis file's gets "-analysis".
    fullname = deploy["metadata"]["name"] if deploy else ""
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    cm = configmaps.pop(fullname, None)
    analysis_cm = configmaps.pop(f"{fullname}-analysis", None)
    dashboard_cm = configmaps.pop(f"{fullname}-dashboard", None)
    check(not configmaps, f"unexpected ConfigMaps {sorted(configmaps)}")
    service = one(docs, "Service")
    job = one(docs, "Job", "migrations")
    scaled = one(docs, "ScaledObject")
    hpa = one(docs, "HorizontalPodAutoscaler")
    pdb = one(docs, "PodDisruptionBudget")
    monitor = one(docs, "ServiceMonitor")
    policy = one(docs, "NetworkPolicy")
    rule = one(docs, "PrometheusRule")
    if cm is None or deploy is None or service is None:
        print("check_rendered: ConfigMap, Deployment and Service are required", file=sys.stderr)
        return 1
    config = cm["data"]
    check(not (SECRET_ENV & set(config)), "a secret in the ConfigMap")

    pod = deploy["spec"]["template"]
    selector = deploy["spec"]["selector"]["matchLabels"]
    check(selector.items() <= pod["metadata"]["labels"].items(), "selector does not match pods")
    worker = check_pod("Deployment", pod)
    check(
        pod["spec"].get("terminationGracePeriodSeconds", 30) >= 45,
        "terminationGracePeriodSeconds < 45 (shutdown drains for up to 30 s)",
    )
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    check(str(ports.get("http")) == config["EMBEDDING_WORKER_HTTP__PORT"], "port http != setting")
    check(worker["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness not /healthz")
    check(worker["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness not /readyz")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        if probe in worker:
            check(worker[probe]["httpGet"]["port"] == "http", f"{probe} not on port http")
    check(
        {"configMapRef": {"name": cm["metadata"]["name"]}} in worker.get("envFrom", []),
        "the worker does not load the ConfigMap",
    )
    check(service["spec"]["selector"] == selector, "Service selector != Deployment selector")
    check(
        any(p["targetPort"] == "http" for p in service["spec"]["ports"]),
        "Service does not target port http",
    )

    if job is not None:
        annotations = job["metadata"].get("annotations", {})
        hooks = set(annotations.get("helm.sh/hook", "").split(","))
        check({"pre-install", "pre-upgrade"} <= hooks, "Job is not a pre-install/upgrade hook")
        check("helm.sh/hook-delete-policy" in annotations, "Job has no hook-delete-policy")
        job_pod = job["spec"]["template"]
        check(
            not selector.items() <= job_pod["metadata"].get("labels", {}).items(),
            "the Deployment's selector matches the Job's pod",
        )
        migrate = check_pod("Job", job_pod)
        check(migrate.get("args") == ["migrate"], "Job does not run `migrate`")
        check(migrate["image"] == worker["image"], "Job image != worker image")
        env = container_env(migrate)
        inline = {k: v.get("value") for k, v in env.items() if "value" in v}
        check(inline == config, f"Job settings != ConfigMap: {inline} vs {config}")
        # The worker's own env also points at the analysis file when analysis is on, and
        # names its pod for the traces when tracing is on.
        worker_env = {k: v for k, v in container_env(worker).items() if k not in WORKER_ONLY_ENV}
        check(
            {k: v for k, v in env.items() if k not in config} == worker_env,
            "Job secrets/extra env != worker's",
        )

    host = config.get("EMBEDDING_WORKER_HTTP__HOST", "")
    check(
        bool(host) and not host.startswith("127.") and host not in ("localhost", "::1"),
        f"the probe port binds {host!r}: the probes would be refused",
    )
    if args.values:
        with open(args.values) as f:
            values = json.load(f)
        check(host == values["bindAddress"], f"the ConfigMap's bind address {host!r}")
        check(
            (policy is not None) == values["networkPolicy"]["enabled"],
            "a NetworkPolicy rendered without networkPolicy.enabled, or missing with it",
        )
        check_monitoring(values, dashboard_cm, rule)
        check_tracing(values["tracing"], config, container_env(worker))
    if policy is not None:
        spec = policy["spec"]
        check(spec["podSelector"]["matchLabels"] == selector, "NetworkPolicy selector")
        check("Ingress" in spec["policyTypes"], "NetworkPolicy does not isolate ingress")
        admitted = [p for rule in spec.get("ingress", []) for p in rule.get("ports", [None])]
        check(
            admitted == [{"port": "http", "protocol": "TCP"}],
            f"NetworkPolicy admits {admitted}, not the http port only",
        )
        if "Egress" in spec["policyTypes"]:
            check(bool(spec.get("egress")), "NetworkPolicy denies all egress")

    check_analysis(pod, worker, analysis_cm, job, config)

    check(not (scaled and hpa), "both a ScaledObject and an HPA")
    if scaled or hpa:
        check("replicas" not in deploy["spec"], "Deployment sets replicas under an autoscaler")
    else:
        check(deploy["spec"].get("replicas", 1) <= args.partitions, "replicas > partitions")
    if scaled is not None:
        spec = scaled["spec"]
        check(spec["scaleTargetRef"]["name"] == deploy["metadata"]["name"], "KEDA target")
        check(spec["maxReplicaCount"] <= args.partitions, "KEDA max > partitions")
        check(spec["minReplicaCount"] <= spec["maxReplicaCount"], "KEDA min > max")
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            if trigger["type"] == "kafka":
                consumes = {  # what the worker consumes (its settings, else its defaults)
                    "topic": config.get("EMBEDDING_WORKER_KAFKA__INPUT_TOPIC", "content.events"),
                    "consumerGroup": config.get(
                        "EMBEDDING_WORKER_KAFKA__GROUP_ID", "embedding-worker"
                    ),
                    "bootstrapServers": config.get(
                        "EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS", "localhost:9092"
                    ),
                }
                watched = {key: meta.get(key) for key in consumes}
                check(watched == consumes, f"KEDA watches {watched}, the worker reads {consumes}")
                check(meta.get("allowIdleConsumers") == "false", "KEDA may exceed partitions")
            else:
                check("embedding_worker_consumer_lag" in meta["query"], "prometheus query")
    if hpa is not None:
        spec = hpa["spec"]
        check(spec["scaleTargetRef"]["name"] == deploy["metadata"]["name"], "HPA target")
        check(spec["maxReplicas"] <= args.partitions, "HPA max > partitions")
    if pdb is not None:
        check(pdb["spec"]["selector"]["matchLabels"] == selector, "PDB selector")
    if monitor is not None:
        check(monitor["spec"]["selector"]["matchLabels"] == selector, "ServiceMonitor selector")
        check(
            [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
            and monitor["spec"]["endpoints"][0]["path"] == "/metrics",
            "ServiceMonitor does not scrape http /metrics",
        )

    kinds = ", ".join(sorted(d["kind"] for d in docs))
    name = args.name or args.rendered
    if failures:
        for message in failures:
            print(f"FAIL {name}: {message}", file=sys.stderr)
        return 1
    print(f"ok   {name}: chart invariants hold ({kinds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
